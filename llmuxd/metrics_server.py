"""The /metrics HTTP listener: prometheus_client's handler behind a bounded server.

Why not ``prometheus_client.start_http_server``: it binds 0.0.0.0 by default and
runs one unbounded thread per connection with no timeout (300 idle TCP
connections meant 300 daemon threads). Here the handler is the same
(``MetricsHandler``: exposition format, gzip, ``?name[]=`` filters), the address
is ``metrics_host`` (127.0.0.1 by default), at most ``METRICS_MAX_CONNECTIONS``
connections are served at once (a 503 beyond), and each must send its request
within ``daemon.read_timeout_secs``.
"""

from __future__ import annotations

import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from llmuxd.connlimits import ConnectionGate, refuse

log = structlog.get_logger("llmuxd.metrics")

METRICS_MAX_CONNECTIONS = 32
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 31\r\nConnection: close\r\n\r\ntoo many connections; retry.\r\n\r\n")


class BoundedMetricsServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose connection threads go through a ConnectionGate."""

    daemon_threads = True
    request_queue_size = 128    # the listen backlog (socketserver's default is 5)

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 read_timeout: float, cap: int = METRICS_MAX_CONNECTIONS) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.address_family = family
        handler: Any = type("BoundedMetricsHandler", (MetricsHandler.factory(registry),),
                            {"timeout": read_timeout})
        self.gate = ConnectionGate(cap, "metrics")
        super().__init__((host, port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate.admit(request, lambda conn: self._work(conn, client_address)) == "full":
            refuse(request, _BUSY)

    def _work(self, conn: Any, client_address: Any) -> None:
        try:
            self.finish_request(conn, client_address)
        except Exception:
            self.handle_error(conn, client_address)
        finally:
            self.shutdown_request(conn)
            self.gate.leave()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line instead of socketserver's traceback on stderr."""
        import sys
        exc = sys.exc_info()[1]
        log.warning("metrics_request_failed", client=str(client_address), error=repr(exc))

    def server_close(self) -> None:
        self.gate.close()
        super().server_close()


def serve_metrics(host: str, port: int, registry: CollectorRegistry,
                  read_timeout: float) -> BoundedMetricsServer:
    """Start serving on a daemon thread; raises OSError when the address is unusable."""
    server = BoundedMetricsServer(host, port, registry, read_timeout)
    threading.Thread(target=server.serve_forever, name="metrics-accept", daemon=True).start()
    return server
