"""The minimal HTTP/1.1 client: framing, keep-alive and failure edges, over socketpairs."""

from __future__ import annotations

import socket
import threading

import pytest

from llmuxd.proxy.http1 import Connection, PeerClosed, Pool, ProtocolError


def pair() -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    return Connection(lambda: ours), theirs


def hang_up(peer: socket.socket) -> None:
    """Read what was sent (closing on unread data would be a reset), then close."""
    peer.recv(65536)
    peer.close()


def body_of(conn: Connection) -> list[bytes]:
    pieces = []
    while piece := conn.read_some():
        pieces.append(piece)
    return pieces


def test_content_length_body_and_keep_alive() -> None:
    conn, peer = pair()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", 5)
    assert peer.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")
    head = conn.read_head()
    assert (head.status, head.get("x-a"), head.length) == (200, "b", 5)
    assert b"".join(body_of(conn)) == b"hello"
    assert conn.reusable


def test_chunked_body_with_extension_and_trailer_arrives_piece_by_piece() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    peer.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nfirst\r\n")
    head = conn.read_head()
    assert head.chunked
    assert conn.read_some() == b"first"  # returned before the next chunk exists
    peer.sendall(b"6\r\nsecond\r\n0\r\nTrailer: x\r\n\r\n")
    assert conn.read_some() == b"second"
    assert conn.read_some() == b""
    assert conn.reusable


def test_interim_100_continue_is_skipped() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    peer.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"
                 b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert conn.read_head().status == 201
    assert conn.read_all() == b"ok"


def test_connection_close_and_close_delimited_body_are_not_reused() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    peer.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
    hang_up(peer)
    assert conn.read_head().keep_alive is False
    assert conn.read_all() == b"until the end"
    assert not conn.reusable


def test_peer_closing_before_answering_is_peer_closed() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    hang_up(peer)
    with pytest.raises(PeerClosed):
        conn.read_head()


def test_short_content_length_body_is_a_protocol_error() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    hang_up(peer)
    conn.read_head()
    assert conn.read_some() == b"abc"
    with pytest.raises(ProtocolError):
        conn.read_some()


def test_garbage_status_line_is_a_protocol_error() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    peer.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ProtocolError):
        conn.read_head()


def test_large_body_split_across_reads() -> None:
    conn, peer = pair()
    conn.send(b"x", 5)
    payload = bytes(range(256)) * 2000
    writer = threading.Thread(target=peer.sendall, args=(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload,))
    writer.start()
    conn.read_head()
    assert conn.read_all() == payload
    writer.join(10)


def test_pool_reuses_the_latest_idle_connection_and_drops_dead_ones() -> None:
    peers: list[socket.socket] = []

    def connect() -> socket.socket:
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        return ours

    pool = Pool(connect)
    a, b = pool.take(), pool.take()
    for conn, body in ((a, b"x"), (b, b"y")):
        conn.send(body, 5)
    for conn, peer in ((a, peers[0]), (b, peers[1])):
        peer.recv(10)
        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.read_head()
        assert conn.reusable
    pool.give_back(a)
    pool.give_back(b)
    assert pool.take() is b  # most recently used first
    peers[0].close()  # a's peer hangs up while a sits idle in the pool
    a.idle_since -= 10  # ... long enough to be checked before use
    fresh = pool.take()
    assert fresh is not a and fresh.sock is None
    assert a.sock is None  # closed, not handed out
