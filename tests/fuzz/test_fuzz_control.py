"""R3: the control API of a real llmuxd under random and malformed HTTP.

Every case goes over the real Unix socket: random methods, route-shaped and random
paths, query strings, headers and bodies, and raw byte soup. After each case the
answer (if any) is a well-formed HTTP response with a JSON body, an error in the
API's shape, never a 500 or a traceback; and the daemon still answers status.
At the end the daemon's own log holds no traceback. Bounded by example counts
(about 20 s on a laptop).
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmux_testkit.daemon import DaemonProcess

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

ROUTES = ["/v1/health", "/v1/status", "/v1/reload", "/v1/models/{m}", "/v1/models/{m}/start",
          "/v1/models/{m}/wake", "/v1/models/{m}/switch", "/v1/models/{m}/sleep",
          "/v1/models/{m}/kill", "/v1/models/{m}/logs", "/v1/validate/{m}", "/v1/leases",
          "/v1/leases/{m}/release", "/v1/leases/{m}"]
token = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF,
                              blacklist_characters="?#"), min_size=0, max_size=12)
models = st.one_of(st.sampled_from(["a", "b", "alpha", "zz", "", "..", "%2F", "a%00"]), token)
paths = st.one_of(
    st.builds(lambda r, m: r.replace("{m}", m), st.sampled_from(ROUTES), models),
    st.builds(lambda parts: "/" + "/".join(parts), st.lists(token, max_size=5)),
    st.text(max_size=30),
)
queries = st.one_of(st.just(""), st.builds(
    lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv),
    st.lists(st.tuples(st.sampled_from(["wait", "lines", "level", "timeout", "x"]),
                       st.one_of(token, st.integers(-5, 10**12).map(str))), max_size=3)))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["model", "level", "levels", "status", "duration_ms",
                                 "verbose", "timeout", "x"]), inner, max_size=4)),
    max_leaves=8)
bodies = st.one_of(st.just(b""), json_values.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=64))
header_names = st.sampled_from(["Content-Type", "Connection", "Transfer-Encoding",
                                "Content-Length", "Expect", "X-Random", "Host"])
header_values = st.one_of(st.sampled_from(["chunked", "close", "keep-alive", "100-continue",
                                           "-1", "\u00b2", "application/json", "0", ""]),
                          st.text(st.characters(max_codepoint=255,
                                                blacklist_characters="\r\n"), max_size=20))
# Content-Length values a lax parser gets wrong: "²" passes str.isdigit(), int() then fails.
odd_lengths = st.sampled_from(["\u00b2", "\u00b9\u00b2", "\u0665", "+5", "-1", "1_0", " 5 ",
                               "5 5", "0x10", "1e3", "5,5", "5, 6", "", "9" * 30, "0" * 20 + "1"])
methods = st.one_of(st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS"]),
                    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8))


def _wire(text: str) -> bytes:
    """Header text as bytes: latin-1 where it fits (how the server decodes), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _exchange(d: DaemonProcess, payload: bytes) -> bytes:
    """Send ``payload``, close our writing side, read everything the daemon answers."""
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(30)
        s.connect(d.socket)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
        return data


def _check_answers(data: bytes) -> None:
    assert b"Traceback" not in data
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:300]
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), data[:300]
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                      if k.strip().lower() == b"content-length")
        body, data = rest[:length], rest[length:]
        assert len(body) == length
        payload: Any = json.loads(body)
        assert status != 500, payload
        if status >= 400:
            assert isinstance(payload["error"]["code"], str), payload
            assert isinstance(payload["error"]["message"], str), payload


_seen = {"log": 0}


def _still_serves(d: DaemonProcess) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.output()[-3000:]
    out = d.output()
    new, _seen["log"] = out[_seen["log"]:], len(out)
    assert "Traceback" not in new, new[-5000:]
    code, body = d.request("GET", "/v1/status", timeout=30)
    assert code == 200 and "models" in body
    # Leases the fuzz took in our name would hold their model: hand them back.
    code, leases = d.request("GET", "/v1/leases", timeout=30)
    assert code == 200
    for lease in leases["leases"]:
        d.request("POST", f"/v1/leases/{lease['lease_id']}/release", {"status": 200})


@FUZZ
@given(method=methods, path=paths, query=queries, body=bodies,
       headers=st.lists(st.tuples(header_names, header_values), max_size=4),
       length=st.one_of(st.none(), st.integers(-3, 1 << 21).map(str), odd_lengths,
                        header_values))
def test_random_requests(daemon, method, path, query, body, headers, length):
    head = f"{method} {path}{query} HTTP/1.1\r\n".encode("utf-8", "surrogatepass")
    for name, value in headers:
        head += _wire(f"{name}: {value}\r\n")
    cl = str(len(body)) if length is None else length
    head += _wire(f"Content-Length: {cl}\r\nConnection: close\r\n\r\n")
    _check_answers(_exchange(daemon, head + body))
    _still_serves(daemon)


header_lines = st.one_of(
    st.builds(lambda v: b"Content-Length: " + _wire(v) + b"\r\n",
              st.one_of(odd_lengths, header_values)),
    st.builds(lambda n, v: n.encode() + b": " + _wire(v) + b"\r\n",
              header_names, header_values),
    st.binary(max_size=40).map(lambda b: b + b"\r\n"))
raw_requests = st.builds(
    lambda m, p, v, hs, body: m + b" " + p + b" " + v + b"\r\n" + b"".join(hs) + b"\r\n" + body,
    st.sampled_from([b"GET", b"POST", b"", b"G\xe9T"]),
    st.sampled_from([b"/v1/status", b"/v1/leases", b"/v1/models/a/sleep", b"*", b""]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b""]),
    st.lists(header_lines, max_size=5), bodies)


@FUZZ
@given(st.one_of(
    raw_requests,
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"GET", b"POST", b" ", b"/v1/status", b"HTTP/1.1", b"HTTP/1.0",
                              b"\r\n", b"\n", b":", b"Content-Length", b"99", b"\xb2",
                              b"\x00", b"{", b"}", b"Transfer-Encoding: chunked"]),
             max_size=30).map(b"".join)))
def test_malformed_http(daemon, payload):
    _check_answers(_exchange(daemon, payload))
    _still_serves(daemon)


def test_the_daemon_logged_no_traceback(daemon):
    _still_serves(daemon)
    out = daemon.output()
    assert "Traceback" not in out, out[-5000:]
