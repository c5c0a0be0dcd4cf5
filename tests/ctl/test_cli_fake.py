"""llmuxctl as a real process against a fake control API on a real Unix socket.

These pin down the CLI's side of the contract (routes it calls, what it prints, exit
codes, hints) including daemon behaviours that are hard to provoke in the real llmuxd
on cue (403, hang-ups, slow operations). test_cli_daemon.py repeats the main paths
against the real llmuxd with simulated children.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from .conftest import REPO, ctl_env, group_of, run_ctl
from .fake_daemon import FakeDaemon


def sock(fake: FakeDaemon) -> list[str]:
    return ["-s", fake.path]


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------
# status


def test_status_prints_an_aligned_table_of_every_model(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["MODEL", "STATE", "SLEEP"]
    for column in ("PID", "PORT", "IN-FLIGHT", "QUEUED", "GPU", "MEM", "IN", "LAST"):
        assert column in header
    alpha = next(line for line in lines if line.startswith("alpha"))
    beta = next(line for line in lines if line.startswith("beta"))
    assert alpha.split()[1:3] == ["ACTIVE", "-"]
    assert "36864 MiB" in alpha and "4242" in alpha and "8101" in alpha
    assert "beta->alpha ok 0.76s, 5m ago" in alpha
    assert beta.split()[1:3] == ["SLEEPING", "L2"]
    # aligned: every row's STATE column starts where the header's does
    col = lines[0].index("STATE")
    assert alpha[col:col + 6] == "ACTIVE" and beta[col:col + 8] == "SLEEPING"
    assert "GPU 0 Simulated H100: 38195 / 81920 MiB used" in lines
    assert r.stderr == ""


@pytest.mark.parametrize("where", ["global", "after-command"])
def test_status_json_is_the_daemons_data(fake: FakeDaemon, where: str) -> None:
    args = ["--json", "status"] if where == "global" else ["status", "--json"]
    r = run_ctl(*sock(fake), *args)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data["models"]) == {"alpha", "beta"}
    assert data["models"]["beta"]["sleep_level"] == 2
    assert data["gpus"][0]["total_mib"] == 81920


def test_status_of_named_models_and_aliases(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "status", "a")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["alpha"]


def test_status_of_an_unknown_model_fails_with_the_daemons_message(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "status", "alpha", "nope")
    assert r.returncode == 1
    assert "alpha" in r.stdout
    assert r.stderr.strip() == ("llmuxctl: unknown model 'nope'; "
                                "see the models with: llmuxctl status")


# ---------------------------------------------------------------------------
# long operations


@pytest.mark.parametrize(("command", "state"), [
    ("start", "ACTIVE"), ("wake", "ACTIVE"), ("switch", "ACTIVE"), ("kill", "STOPPED"),
])
def test_model_operations_wait_and_report_the_new_state(fake: FakeDaemon, command: str,
                                                        state: str) -> None:
    model = "beta"
    r = run_ctl(*sock(fake), command, model)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{model}: ")
    assert ("POST", f"/v1/models/{model}/{command}?wait=1", None) in fake.state.requests
    status = json.loads(run_ctl(*sock(fake), "--json", "status", model).stdout)
    assert status["models"][model]["state"].upper() == state


def test_switch_prints_the_phase_timings(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "switch", "beta")
    assert r.returncode == 0, r.stderr
    assert "beta: switch beta->beta: ok; drain 0ms, sleep 10ms, wake 20ms" in r.stdout


def test_sleep_defaults_to_the_configured_level(fake: FakeDaemon) -> None:
    fake.state.models["beta"]["state"] = "active"
    r = run_ctl(*sock(fake), "sleep", "beta")
    assert r.returncode == 0, r.stderr
    assert ("POST", "/v1/models/beta/sleep?wait=1", {"level": 2}) in fake.state.requests
    assert r.stdout.startswith("beta: slept, asleep at L2")


def test_sleep_level_3_stops_the_model(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "sleep", "alpha", "--level", "3")
    assert r.returncode == 0, r.stderr
    assert ("POST", "/v1/models/alpha/sleep?wait=1", {"level": 3}) in fake.state.requests
    assert r.stdout.startswith("alpha: slept, stopped")


def test_no_wait_asks_the_daemon_not_to_wait(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "wake", "beta", "--no-wait")
    assert r.returncode == 0, r.stderr
    assert ("POST", "/v1/models/beta/wake?wait=0", None) in fake.state.requests
    assert r.stdout.strip() == "beta: wake requested, now waking (pid 4343, port 8102)"


def test_operation_json_is_the_model_status(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "wake", "beta", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["name"] == "beta" and status["state"] == "active"


def test_a_refused_operation_exits_1_with_the_daemons_message(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "wake", "alpha")
    assert r.returncode == 1
    assert r.stderr.strip() == ("llmuxctl: model 'alpha' is already active; "
                                "see its state with: llmuxctl status alpha")
    assert r.stdout == ""


def test_an_unknown_model_exits_1(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "start", "nope")
    assert r.returncode == 1
    assert r.stderr.strip() == ("llmuxctl: unknown model 'nope'; "
                                "see the models with: llmuxctl status")


def test_json_errors_are_json_too(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "--json", "start", "nope")
    assert r.returncode == 1
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "model_not_found" and err["exit_code"] == 1
    assert err["model"] == "nope"


def test_timeout_gives_up_waiting_with_exit_1(fake: FakeDaemon) -> None:
    fake.state.op_delay = 30.0
    r = run_ctl(*sock(fake), "wake", "beta", "--timeout", "0.5")
    assert r.returncode == 1
    assert r.stderr.strip() == ("llmuxctl: gave up after 0.5s waking beta; llmuxd carries "
                                "on; see: llmuxctl status beta (wait longer with "
                                "--timeout SECS)")


def test_progress_line_on_a_tty_and_silence_without(fake: FakeDaemon) -> None:
    fake.state.op_delay = 1.5
    quiet = run_ctl(*sock(fake), "wake", "beta")
    assert quiet.returncode == 0 and quiet.stderr == ""
    fake.state.models["beta"]["state"] = "sleeping"
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "llmuxctl", *sock(fake), "wake", "beta"],
                                cwd=REPO, env=ctl_env(), stdout=subprocess.PIPE,
                                stderr=slave, text=True)
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        seen = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    text = seen.decode()
    assert "waking beta" in text, text
    assert text.endswith("\r\x1b[K"), "the progress line must be erased at the end"
    assert out.startswith("beta: woke, active")


def test_ctrl_c_while_waiting_exits_130_and_says_llmuxd_carries_on(fake: FakeDaemon) -> None:
    fake.state.op_delay = 60.0
    proc = subprocess.Popen([sys.executable, "-m", "llmuxctl", *sock(fake), "wake", "beta"],
                            cwd=REPO, env=ctl_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(r[1].startswith("/v1/models/beta/wake")
                             for r in fake.state.requests), what="the wake request")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip() == ("llmuxctl: interrupted waking beta; llmuxd carries on; "
                           "see: llmuxctl status beta")


# ---------------------------------------------------------------------------
# logs


def test_logs_prints_the_last_lines(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "logs", "alpha", "-n", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["alpha line 98", "alpha line 99", "alpha line 100"]
    data = json.loads(run_ctl(*sock(fake), "logs", "alpha", "-n", "2", "--json").stdout)
    assert data["lines"] == ["alpha line 99", "alpha line 100"]
    assert data["path"] == "/var/log/llmux/alpha.log"


class Lines:
    """Lines of a child's stdout, read by a thread (select does not see Python's buffer)."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self.queue.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        self.queue.put(None)

    def next(self, timeout: float = 30.0) -> str | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from llmuxctl within {timeout:g}s") from None


def test_logs_follow_prints_new_lines_until_ctrl_c(fake: FakeDaemon) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llmuxctl", *sock(fake), "logs", "alpha",
                             "-f", "-n", "2"], cwd=REPO, env=ctl_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        lines = Lines(proc.stdout)
        assert [lines.next(), lines.next()] == ["alpha line 99", "alpha line 100"]
        with fake.state.lock:
            fake.state.logs["alpha"] += ["alpha line 100", "new 1", "new 2"]
        assert [lines.next() for _ in range(3)] == ["alpha line 100", "new 1", "new 2"]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert err == ""


def test_logs_follow_ends_quietly_when_the_reader_goes_away(fake: FakeDaemon) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llmuxctl", *sock(fake), "logs", "alpha",
                             "-f", "-n", "1"], cwd=REPO, env=ctl_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "alpha line 100\n"
        proc.stdout.close()  # like `| head -1` exiting
        with fake.state.lock:
            fake.state.logs["alpha"] += ["more"] * 5
        rc = proc.wait(timeout=60)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert err == ""


def test_new_lines_finds_the_overlap_of_two_tails() -> None:
    from llmuxctl.commands import new_lines

    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines([], ["x"]) == ["x"]
    assert new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]  # rotated: all new
    assert new_lines(["x", "a", "a"], ["a", "a", "a"]) == ["a"]


# ---------------------------------------------------------------------------
# reload, validate, version


def test_reload_prints_what_changed(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "reload")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["gamma: added", "beta: changed"]
    fake.state.reload_result = {"added": [], "removed": [], "changed": []}
    assert run_ctl(*sock(fake), "reload").stdout == "no changes\n"
    data = json.loads(run_ctl(*sock(fake), "reload", "--json").stdout)
    assert data == {"added": [], "removed": [], "changed": []}


def test_validate_pass_prints_the_seeds_table_and_exits_0(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "validate", "alpha", "--levels", "1,2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["Level", "Sleep", "(s)", "Wake", "(s)", "GPU", "Before",
                                "GPU", "After", "GPU", "Wake", "Response", "Pass"]
    assert lines[1] == "-" * 88
    assert lines[2].split() == ["L1", "0.5", "0.2", "36864", "MiB", "1331", "MiB", "36864",
                                "MiB", "match", "OK"]
    assert lines[3].split()[0] == "L2"
    assert lines[-1] == "Result: ALL PASSED"
    assert ("POST", "/v1/validate/alpha", {"levels": [1, 2], "verbose": False}
            ) in fake.state.requests


def test_validate_failure_shows_the_fail_row_and_reason_and_exits_1(fake: FakeDaemon) -> None:
    fake.state.validate_fail_level = 2
    r = run_ctl(*sock(fake), "validate", "alpha", "--levels", "1,2", "--verbose")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[:2] == ["L1: POST /sleep?level=1", "L2: POST /sleep?level=2"]
    row = next(line for line in lines if line.startswith("L2 "))
    assert row.split()[-1] == "FAIL"
    assert "L2: FAIL: the sleep freed nothing: GPU 0 holds 36864 MiB" in lines
    assert lines[-1] == "Result: SOME FAILED"


def test_validate_json_and_bad_levels(fake: FakeDaemon) -> None:
    r = run_ctl(*sock(fake), "validate", "alpha", "--levels", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
    bad = run_ctl(*sock(fake), "validate", "alpha", "--levels", "1,5")
    assert bad.returncode == 2
    assert "levels are a comma-separated list of 1, 2, 3" in bad.stderr


def test_version_shows_client_and_daemon(fake: FakeDaemon) -> None:
    from llmuxctl import __version__

    r = run_ctl(*sock(fake), "version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"llmuxctl {__version__}"
    assert lines[1].startswith("llmuxd 9.9.9-fake (pid ")
    data = json.loads(run_ctl(*sock(fake), "version", "--json").stdout)
    assert data["llmuxctl"] == __version__ and data["llmuxd"] == "9.9.9-fake"


def test_version_without_daemon_prints_ours_then_exits_3(short_dir: Path) -> None:
    from llmuxctl import __version__

    r = run_ctl("-s", str(short_dir / "none.sock"), "version")
    assert r.returncode == 3
    assert r.stdout == f"llmuxctl {__version__}\n"


# ---------------------------------------------------------------------------
# exit codes 3 and 4, usage errors


def test_no_daemon_exits_3_with_the_start_hint(short_dir: Path) -> None:
    path = short_dir / "llmuxd.sock"
    r = run_ctl("-s", str(path), "status")
    assert r.returncode == 3
    assert r.stderr == (f"llmuxctl: llmuxd is not running (no socket at {path}); "
                        "start it with: systemctl start llmux\n")


def test_no_daemon_with_json_prints_the_error_as_json(short_dir: Path) -> None:
    r = run_ctl("-s", str(short_dir / "llmuxd.sock"), "--json", "status")
    assert r.returncode == 3
    err = json.loads(r.stdout)["error"]
    assert (err["code"], err["exit_code"]) == ("unreachable", 3)
    assert err["message"].startswith("llmuxd is not running (no socket at ")


def test_stale_socket_exits_3(short_dir: Path) -> None:
    path = short_dir / "llmuxd.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    r = run_ctl("-s", str(path), "status")
    assert r.returncode == 3
    assert "stale socket" in r.stderr and "Traceback" not in r.stderr


def test_daemon_hanging_up_exits_3(fake: FakeDaemon) -> None:
    fake.state.hang_up = True
    r = run_ctl(*sock(fake), "status")
    assert r.returncode == 3
    assert r.stderr.startswith(f"llmuxctl: llmuxd closed the connection on {fake.path}")


def test_daemon_permission_denied_exits_4_with_the_group_hint(fake: FakeDaemon) -> None:
    fake.state.deny_mutations = True
    r = run_ctl(*sock(fake), "wake", "beta")
    assert r.returncode == 4
    assert r.stderr == (f"llmuxctl: permission denied on {fake.path}: add yourself to "
                        "group " + group_of(fake.path) + " (then log in again)\n")


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["sleep"], ["sleep", "alpha", "--level", "4"],
    ["logs", "alpha", "-n", "-1"], ["wake", "alpha", "--timeout", "0"],
    ["-c", "/x.toml", "-s", "/x.sock", "status"],
])
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    r = run_ctl(*args)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    assert "usage: llmuxctl" in r.stderr


def test_help_documents_exit_codes() -> None:
    r = run_ctl("--help")
    assert r.returncode == 0
    for line in ("0  success", "3  llmuxd unreachable", "4  permission denied"):
        assert line in r.stdout
    assert "_models" not in r.stdout


# ---------------------------------------------------------------------------
# socket resolution


def test_socket_from_env_and_from_config(fake: FakeDaemon, short_dir: Path) -> None:
    r = run_ctl("status", env=ctl_env(LLMUX_SOCKET=fake.path))
    assert r.returncode == 0, r.stderr
    config = short_dir / "llmux.toml"
    config.write_text(f'[daemon]\nsocket = "{fake.path}"\n\n'
                      '[models.alpha]\nmodel_path = "m"\nport = 8101\n')
    r = run_ctl("-c", str(config), "status")
    assert r.returncode == 0, r.stderr
    # -s beats $LLMUX_SOCKET
    r = run_ctl("-s", str(short_dir / "other.sock"), "status",
                env=ctl_env(LLMUX_SOCKET=fake.path))
    assert r.returncode == 3
    # a config with a mistake still gives its socket: the daemon is what matters
    config.write_text(f'typo = 1\n[daemon]\nsocket = "{fake.path}"\n')
    assert run_ctl("-c", str(config), "status").returncode == 0


def test_unusable_config_is_a_usage_error(short_dir: Path) -> None:
    r = run_ctl("-c", str(short_dir / "missing.toml"), "status")
    assert r.returncode == 2
    assert r.stderr.startswith(f"llmuxctl: cannot use config {short_dir}/missing.toml: ")
    bad = short_dir / "bad.toml"
    bad.write_text("this is [not toml\n")
    r = run_ctl("-c", str(bad), "status")
    assert r.returncode == 2
    assert "invalid TOML" in r.stderr and "--check-config" in r.stderr
