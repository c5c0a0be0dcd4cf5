"""Debian's nginx as the reference proxy: plain reverse proxy, no buffering, keepalive.

This is the floor a proxy can reach on this box; llmux's numbers are read against
it. Runs in the foreground of its own process group, with every path in a temp
prefix, on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


class Nginx:
    """``nginx -g 'daemon off;'`` proxying listen ports to upstream ports."""

    def __init__(self, binary: str, prefix: Path, routes: dict[int, int], workers: int = 2
                 ) -> None:
        self.binary = binary
        self.prefix = prefix
        self.routes = routes  # listen port -> upstream port
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    def write_conf(self) -> Path:
        servers = []
        for listen, upstream in self.routes.items():
            servers.append(f"""
    upstream up{upstream} {{ server 127.0.0.1:{upstream}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{listen} backlog=2048;
        location / {{
            proxy_pass http://up{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}""")
        conf = TEMPLATE.read_text().replace("@WORKERS@", str(self.workers)) \
            .replace("@PREFIX@", str(self.prefix)).replace("@SERVERS@", "\n".join(servers))
        path = self.prefix / "nginx.conf"
        path.write_text(conf)
        return path

    def start(self, timeout: float = 20.0) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "logs").mkdir(exist_ok=True)
        conf = self.write_conf()
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=open(self.prefix / "stderr.log", "wb"),  # noqa: SIM115
            start_new_session=True)
        deadline = time.monotonic() + timeout
        for port in self.routes:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("nginx exited: "
                                       + (self.prefix / "stderr.log").read_text()[-2000:])
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=1):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nginx did not listen on {port}")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            master = psutil.Process(self.proc.pid)
            return [master.pid] + [c.pid for c in master.children()]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
