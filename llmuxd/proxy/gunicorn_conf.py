"""gunicorn settings for the front end, read from the llmux config (env LLMUX_CONFIG).

An asyncio worker (llmuxd/proxy/worker.py: uvicorn's gunicorn worker on uvloop
and httptools, with llmux's timeouts): one event loop per worker serves thousands
of connections and streams, where a thread per open request capped concurrency
and lost the GIL race to hundreds of relaying threads (docs/benchmarks.md).
``workers`` comes from ``[proxy]``; ``max_connections`` bounds each worker.
The access log is off: the app writes one structured line per request itself.

llmuxd starts this itself (llmuxd/frontend.py). To run the front end on its own
(e.g. a separate systemd unit next to ``llmuxd --no-frontend``):

    LLMUX_CONFIG=/etc/llmux.toml LLMUX_SOCKET=/run/llmux/llmuxd.sock \
        gunicorn -c python:llmuxd.proxy.gunicorn_conf 'llmuxd.proxy.app:get_app()'
"""

from __future__ import annotations

import math
import os

from llmuxd.config import load_config
from llmuxd.proxy import logs

_config = load_config(os.environ.get("LLMUX_CONFIG", "/etc/llmux.toml"))
_proxy = _config.proxy

_host = _proxy.host
bind = [f"[{_host}]:{_proxy.port}" if ":" in _host else f"{_host}:{_proxy.port}"]
worker_class = "llmuxd.proxy.worker.LlmuxWorker"
workers = _proxy.workers
# Clients (SDKs, routers) keep connections open between requests.
keepalive = 75
# The worker heartbeat (the event loop notifies the master); not a request limit.
timeout = 60
# On SIGTERM, and when a reload restarts the workers, what is in flight may run this
# long: by default as long as any request may (so a reload cuts none short); shortly
# before it ends the worker ends what still runs itself (llmuxd/proxy/worker.py).
# llmuxd stopping bounds the whole front end by daemon.stop_timeout_secs anyway.
graceful_timeout = max(1, math.ceil(_proxy.graceful_secs))  # gunicorn wants an int
backlog = 2048
proc_name = "llmux-proxy"
# gunicorn's own control socket (gunicornc) would land in $HOME, shared by every
# instance; llmuxd supervises the front end, so it stays off.
control_socket_disable = True
accesslog = None
errorlog = "-"  # stderr, one JSON object per line
loglevel = "info"
logger_class = logs.GunicornLogger
# Client request headers can be long (tokens, traces); the body is bounded by the app.
limit_request_field_size = 16384
