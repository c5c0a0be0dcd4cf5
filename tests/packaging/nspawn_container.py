"""A throwaway Debian system booted under systemd-nspawn, driven from the host.

Why a real boot: the packaging proof is about systemd's behaviour (Type=notify, reload,
stop of the whole control group, the hardening), which only a real PID 1 shows. The
rootfs is debootstrapped once and cached outside the repository
(packaging/deb/chroot.sh test RELEASE); each run works on a copy and always tears it
down, also when a test fails.

Commands run inside with ``nsenter -t <pid1> -a``: nspawn runs with ``--register=no
--keep-unit`` because no systemd (nor machined) runs on the host, so there is no
``machinectl``. The container has its own network namespace (``--private-network``),
so its port 3000 cannot clash with anything on the host; the package's dependencies
are downloaded into the copy's apt cache before boot, so apt resolves and installs
them inside without a network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something true; raise at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(x) for x in fh.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def _nspid(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class Container:
    """One booted copy of a cached rootfs; use as a context manager."""

    def __init__(self, cached_root: Path, workdir: Path) -> None:
        self.cached_root = cached_root
        self.root = workdir / "root"
        self.console_log = workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.debs_inside: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------

    def prepare(self, debs: Sequence[Path]) -> list[str]:
        """Copy the rootfs, put the .debs in /root, download their dependencies."""
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.cached_root), str(self.root)],
                       check=True, timeout=600)
        inside = []
        for deb in debs:
            shutil.copy2(deb, self.root / "root" / deb.name)
            inside.append(f"/root/{deb.name}")
        self.debs_inside = inside
        # Before boot, with the host's network: apt fills /var/cache/apt/archives, so the
        # install inside (no network) still resolves the dependencies from the archive.
        self.nspawn_run(["apt-get", "update", "-qq"], timeout=600, tries=3)
        self.nspawn_run(["apt-get", "install", "-y", "-q", "--download-only", *inside],
                        timeout=600, tries=3)
        # Keep what was downloaded in the cached rootfs: later runs need no mirror for it.
        cached = self.cached_root / "var/cache/apt/archives"
        for deb in (self.root / "var/cache/apt/archives").glob("*.deb"):
            if deb.name not in {d.name for d in debs} and not (cached / deb.name).exists():
                shutil.copy2(deb, cached / deb.name)
        return inside

    def nspawn_run(self, argv: Sequence[str], timeout: float,
                   tries: int = 1) -> subprocess.CompletedProcess[str]:
        """Run one command in the (not booted) rootfs copy, with the host's network.

        ``tries`` > 1 retries a failure (a mirror's hiccup should not fail the proof).
        """
        for attempt in range(1, tries + 1):
            r = subprocess.run(
                ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2",
                 "-D", str(self.root), *[f"--setenv={k}={v}" for k, v in CLEAN_ENV.items()],
                 *argv],
                timeout=timeout, text=True, capture_output=True, env=CLEAN_ENV,
            )
            if r.returncode == 0 or attempt == tries:
                break
            time.sleep(5)  # back off before asking the mirror again
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} (before boot) exited {r.returncode}\n"
                                 f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r

    def boot(self, timeout: float = 180.0) -> None:
        """Boot systemd in the copy and wait until the system is up."""
        with open(self.console_log, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit",
                 "--private-network", "--console=read-only", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=CLEAN_ENV, start_new_session=True,
            )
        nspawn = self.nspawn

        def find_pid1() -> int:
            if nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited with {nspawn.returncode}: "
                                     f"{self.console_log.read_text(errors='replace')[-2000:]}")
            todo = _children(nspawn.pid)
            while todo:
                pid = todo.pop()
                ns = _nspid(pid)
                if len(ns) > 1 and ns[-1] == 1:
                    return pid
                todo += _children(pid)
            return 0

        self.pid1 = wait_until(find_pid1, timeout, "the container's PID 1")

        def booted() -> bool:
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=timeout)
            return r.stdout.strip() in ("running", "degraded")

        wait_until(booted, timeout, "systemd to finish booting", interval=1.0)

    def teardown(self, timeout: float = 90.0) -> None:
        """Power off (SIGTERM to nspawn), then kill what is left; remove the copy."""
        try:
            if self.nspawn is not None and self.nspawn.poll() is None:
                self.nspawn.send_signal(signal.SIGTERM)  # nspawn: orderly poweroff of the guest
                try:
                    self.nspawn.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    if self.pid1 and _alive(self.pid1):
                        os.kill(self.pid1, signal.SIGKILL)  # ends the whole PID namespace
                    self.nspawn.kill()
                    self.nspawn.wait(timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- inside the booted system -------------------------------------------------------

    def run(self, argv: Sequence[str], *, user: str | None = None, check: bool = True,
            timeout: float = 120.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the booted container (as ``user`` when given)."""
        assert self.pid1, "container not booted"
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i",
               *[f"{k}={v}" for k, v in CLEAN_ENV.items()]]
        if user is not None:
            cmd += ["runuser", "-u", user, "--"]
        r = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=timeout,
                           input=input, env=CLEAN_ENV)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def write(self, path: str, text: str) -> None:
        """Write a file inside the container (through its root directory), atomically.

        Written beside it and renamed over it, keeping its owner and mode: a reader
        (gunicorn re-reading /etc/llmux.toml on the SIGHUP of the previous step's
        reload) must never see a half-written file, as with an admin's editor."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        if target.exists():
            st = target.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, target)

    def processes(self, needle: str) -> list[tuple[int, str]]:
        """Processes in the container's PID namespace whose command line has ``needle``."""
        assert self.pid1
        ns = os.readlink(f"/proc/{self.pid1}/ns/pid")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") != ns or not _alive(pid):
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if needle in cmdline:
                found.append((pid, cmdline))
        return found
