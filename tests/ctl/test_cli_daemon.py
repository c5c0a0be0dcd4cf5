"""Acceptance: llmuxctl as a real process against a real llmuxd with simulated children.

Every command with and without --json, every exit code (0 ok, 1 failed, 2 usage,
3 unreachable, 4 permission denied), and validate passing at L1/L2 and failing when
the simulator's sleep frees nothing or its L2 reload is broken. One daemon serves the
module; tests that need another configuration start their own.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess, sim_model

from .conftest import REPO, Outsider, ctl_env, group_of, run_ctl
from .test_cli_fake import Lines

# Quick simulated models: no load time, 0.1 s warm-up, 0.5 GiB of weights; each takes
# 20 % of the simulated 80 GiB GPU, so all four may be awake together.
SIM_ARGS = ["--sim-load-s", "0", "--sim-warmup-s", "0.1", "--sim-size-gib", "0.5"]
RESIDUE_MIB = 2048


def sim(level: int, *faults: str, **extra: Any) -> dict[str, Any]:
    args = list(SIM_ARGS)
    for fault in faults:
        args += ["--sim-fault", fault]
    return sim_model(sleep_level=level, gpu_memory_utilization=0.2, extra_args=args, **extra)


def base_models() -> dict[str, dict[str, Any]]:
    return {
        "alpha": sim(1, aliases=["a"]),
        "beta": sim(2),
        "nofree": sim(1, "sleep_no_free"),       # vllm#32714: sleep says 200, frees nothing
        "badreload": sim(2, "reload_fail"),      # L2 wake: reload_weights answers 500
        "crashy": sim(1, "crash_at_start"),      # exits 1 before /health: a failed start
    }


def make_open_tmp() -> Path:
    """A daemon dir every user may enter (like /run/llmux), so the socket mode decides."""
    path = Path(tempfile.mkdtemp(prefix="ctl-d-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    tmp = make_open_tmp()
    try:
        with DaemonProcess(base_models(), tmp=tmp) as d:
            yield d
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ctl(d: DaemonProcess, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_ctl("-s", d.socket, *args, timeout=timeout)


def ok(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    r = ctl(d, *args)
    assert r.returncode == 0, f"llmuxctl {' '.join(args)}: {r.stderr}\n{d.output()[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def model_json(d: DaemonProcess, name: str) -> dict[str, Any]:
    data = json.loads(ok(d, "status", name, "--json").stdout)
    return data["models"][name]


def gpu_total(status: dict[str, Any]) -> int:
    return sum(status["gpu_memory_mib"].values())


def wait_gpu(d: DaemonProcess, name: str, awake: bool) -> dict[str, Any]:
    """The model's status once llmuxctl shows its memory awake (> residue) or asleep.

    Polled: llmuxd samples the GPU probe on its own schedule, not on every status.
    """
    def seen() -> dict[str, Any] | None:
        status = model_json(d, name)
        return status if (gpu_total(status) > RESIDUE_MIB) == awake else None
    return d.wait_for(seen, timeout=60, what=f"{name}'s GPU memory {'up' if awake else 'down'}")


# ---------------------------------------------------------------------------
# status and the model operations


def test_status_table_lists_every_model(daemon: DaemonProcess) -> None:
    r = ok(daemon, "status")
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "STATE", "SLEEP"]
    names = [line.split()[0] for line in lines[1:6]]
    assert sorted(names) == ["alpha", "badreload", "beta", "crashy", "nofree"]


def test_status_json_is_the_control_api_status(daemon: DaemonProcess) -> None:
    data = json.loads(ok(daemon, "status", "--json").stdout)
    assert set(data["models"]) == {"alpha", "beta", "nofree", "badreload", "crashy"}
    assert data["models"]["beta"]["configured_sleep_level"] == 2
    direct = daemon.status()
    assert set(direct["models"]) == set(data["models"])


def test_start_sleep_wake_kill_through_llmuxctl(daemon: DaemonProcess) -> None:
    ok(daemon, "kill", "alpha")
    assert model_json(daemon, "alpha")["state"] == "stopped"

    r = ok(daemon, "start", "alpha")
    assert r.stdout.startswith("alpha: started, active (pid ")
    awake = model_json(daemon, "alpha")
    assert awake["state"] == "active" and awake["pid"]

    r = ok(daemon, "sleep", "alpha")  # its configured level: 1
    assert r.stdout.startswith("alpha: slept, asleep at L1")
    asleep = wait_gpu(daemon, "alpha", awake=False)
    assert (asleep["state"], asleep["sleep_level"]) == ("sleeping", 1)

    r = ok(daemon, "wake", "alpha")
    assert r.stdout.startswith("alpha: woke, active")
    assert wait_gpu(daemon, "alpha", awake=True)["state"] == "active"

    r = ok(daemon, "sleep", "alpha", "--level", "2")
    assert r.stdout.startswith("alpha: slept, asleep at L2")

    r = ok(daemon, "kill", "alpha")
    assert r.stdout.startswith("alpha: killed, stopped")
    assert model_json(daemon, "alpha")["pid"] is None


def test_switch_makes_the_model_active(daemon: DaemonProcess) -> None:
    r = ok(daemon, "switch", "beta")
    assert r.stdout.startswith("beta: switched, active")
    assert model_json(daemon, "beta")["state"] == "active"


def test_operations_print_the_model_status_as_json(daemon: DaemonProcess) -> None:
    status = json.loads(ok(daemon, "wake", "a", "--json").stdout)  # by alias
    assert status["name"] == "alpha" and status["state"] == "active"
    status = json.loads(ok(daemon, "sleep", "alpha", "--json").stdout)
    assert status["state"] == "sleeping" and status["sleep_level"] == 1
    status = json.loads(ok(daemon, "kill", "alpha", "--json").stdout)
    assert status["state"] == "stopped" and status["pid"] is None
    status = json.loads(ok(daemon, "start", "alpha", "--json").stdout)
    assert status["state"] == "active" and status["pid"]
    status = json.loads(ok(daemon, "switch", "beta", "--json").stdout)
    assert status["name"] == "beta" and status["state"] == "active"


def test_no_wait_returns_and_the_daemon_carries_on(daemon: DaemonProcess) -> None:
    ok(daemon, "kill", "beta")
    r = ok(daemon, "start", "beta", "--no-wait")
    assert r.stdout.startswith("beta: start requested, now ")
    daemon.wait_state("beta", "active", timeout=120)


def test_named_status_and_aliases(daemon: DaemonProcess) -> None:
    r = ok(daemon, "status", "a")
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["alpha"]


def test_unknown_model_exits_1_with_the_daemons_message(daemon: DaemonProcess) -> None:
    for args in (["start", "nope"], ["status", "nope"], ["logs", "nope"],
                 ["validate", "nope", "--levels", "1"]):
        r = ctl(daemon, *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("llmuxctl: ") and "nope" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = ctl(daemon, "--json", "wake", "nope")
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["code"] == "model_not_found"


def test_failed_start_is_one_line_pointing_at_the_logs(daemon: DaemonProcess) -> None:
    r = ctl(daemon, "start", "crashy")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("llmuxctl: ") and "crashy" in r.stderr
    assert r.stderr.rstrip().endswith("see why with: llmuxctl logs crashy")
    err = json.loads(ctl(daemon, "--json", "start", "crashy").stdout)["error"]
    assert err["exit_code"] == 1 and err["model"] == "crashy"
    status = model_json(daemon, "crashy")
    assert status["state"] in ("backoff", "failed", "stopped") and status["last_error"]


# ---------------------------------------------------------------------------
# logs, reload, version


def test_logs_prints_the_childs_log(daemon: DaemonProcess) -> None:
    ok(daemon, "wake", "alpha")
    r = ok(daemon, "logs", "alpha", "-n", "1000")
    assert r.stdout.strip(), "empty log"
    assert "startup complete" in r.stdout.lower()
    assert len(ok(daemon, "logs", "alpha", "-n", "2").stdout.splitlines()) == 2
    data = json.loads(ok(daemon, "logs", "alpha", "--json").stdout)
    assert data["model"] == "alpha" and data["path"].endswith("alpha.log")


def test_logs_follow_shows_what_the_child_writes_next(daemon: DaemonProcess) -> None:
    ok(daemon, "wake", "alpha")
    # -n 1: the first line printed proves the follower has taken its baseline, so
    # everything the sleep writes afterwards must come out of it (a loaded box may
    # start it late; with -n 0 the sleep's lines could land in its baseline).
    proc = subprocess.Popen([sys.executable, "-m", "llmuxctl", "-s", daemon.socket, "logs",
                             "alpha", "-f", "-n", "1"], cwd=REPO, env=ctl_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        lines = Lines(proc.stdout)
        assert lines.next(timeout=60) is not None, "llmuxctl logs -f printed nothing"
        before = ok(daemon, "logs", "alpha", "-n", "1000").stdout.splitlines()
        ok(daemon, "sleep", "alpha")
        after = ok(daemon, "logs", "alpha", "-n", "1000").stdout.splitlines()
        from llmuxctl.commands import new_lines

        expected = new_lines(before, after)
        assert expected, "sleeping wrote nothing to the child's log"
        # Lines the child wrote between the follower's baseline and `before` come
        # first; the sleep's lines must follow, in order, as the last ones.
        got: list[str | None] = []
        while got[-len(expected):] != expected:
            got.append(lines.next(timeout=60))
            assert got[-1] is not None, f"llmuxctl stopped; printed {got[:-1]}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reload_reports_added_and_removed_models(daemon: DaemonProcess) -> None:
    models = base_models()
    # keep the ports of the running models: a changed port would be a change
    current = daemon.models
    daemon.write_config({**current, "gamma": sim(1)})
    try:
        r = ok(daemon, "reload")
        assert r.stdout.splitlines() == ["gamma: added"]
        assert "gamma" in json.loads(ok(daemon, "status", "--json").stdout)["models"]
    finally:
        daemon.write_config(current)
    data = json.loads(ok(daemon, "reload", "--json").stdout)
    assert data == {"added": [], "removed": ["gamma"], "changed": []}
    assert ok(daemon, "reload").stdout == "no changes\n"
    assert set(models) == set(daemon.models)


def test_version_names_both_sides(daemon: DaemonProcess) -> None:
    from llmuxd import __version__

    r = ok(daemon, "version")
    assert r.stdout.splitlines()[0] == f"llmuxctl {__version__}"
    assert r.stdout.splitlines()[1].startswith(f"llmuxd {__version__} (pid {daemon.pid}")
    data = json.loads(ok(daemon, "version", "--json").stdout)
    assert data["llmuxd"] == __version__ and data["llmuxd_pid"] == daemon.pid


# ---------------------------------------------------------------------------
# validate


def test_validate_passes_at_l1_and_l2(daemon: DaemonProcess) -> None:
    r = ok(daemon, "validate", "alpha", "--levels", "1,2")
    lines = r.stdout.splitlines()
    assert lines[0].split()[0] == "Level" and lines[1] == "-" * 88
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert rows["L1"][-2:] == ["match", "OK"] and rows["L2"][-2:] == ["match", "OK"]
    # the memory went down to the residue and came back
    assert int(rows["L1"][5]) <= RESIDUE_MIB < int(rows["L1"][3])
    assert lines[-1] == "Result: ALL PASSED"


def test_validate_verbose_prints_each_step(daemon: DaemonProcess) -> None:
    answer = json.loads(ok(daemon, "validate", "alpha", "--levels", "1", "--verbose",
                           "--json").stdout)
    assert "L1: POST /sleep?level=1" in answer["steps"]
    r = ok(daemon, "validate", "alpha", "--levels", "1", "--verbose")
    lines = r.stdout.splitlines()
    assert "L1: POST /sleep?level=1" in lines
    assert lines.index("L1: POST /sleep?level=1") < lines.index("Result: ALL PASSED")
    assert lines[-1] == "Result: ALL PASSED"


def test_validate_json(daemon: DaemonProcess) -> None:
    data = json.loads(ok(daemon, "validate", "beta", "--levels", "2", "--json").stdout)
    assert data["passed"] is True and [row["level"] for row in data["rows"]] == [2]


def test_validate_fails_when_sleep_frees_nothing(daemon: DaemonProcess) -> None:
    r = ctl(daemon, "validate", "nofree", "--levels", "1")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    row = next(line for line in lines if line.startswith("L1 "))
    assert row.split()[-1] == "FAIL"
    reason = next(line for line in lines if line.startswith("L1: FAIL: "))
    assert "MiB" in reason, reason
    assert lines[-1] == "Result: SOME FAILED"


def test_validate_fails_when_the_l2_reload_is_broken(daemon: DaemonProcess) -> None:
    r = ctl(daemon, "validate", "badreload", "--levels", "1,2")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert next(x for x in lines if x.startswith("L1 ")).split()[-1] == "OK"
    assert next(x for x in lines if x.startswith("L2 ")).split()[-1] == "FAIL"
    reason = next(x for x in lines if x.startswith("L2: FAIL: "))
    assert "reload" in reason.lower() or "wake" in reason.lower(), reason
    assert lines[-1] == "Result: SOME FAILED"


def test_llmuxd_validate_standalone(tmp_path: Path) -> None:
    """``llmuxd -c CONFIG --validate M`` without a daemon prints the same table."""
    d = DaemonProcess({"alpha": sim(1), "nofree": sim(1, "sleep_no_free")},
                      tmp=tempfile.mkdtemp(prefix="ctl-v-", dir="/tmp"))
    try:
        d.init_gpus()
        d.write_config()
        good = subprocess.run([sys.executable, "-m", "llmuxd", "-c", str(d.config_path),
                               "--validate", "alpha", "--levels", "1,2", "--verbose"],
                              env=d.env(), capture_output=True, text=True, timeout=300)
        assert good.returncode == 0, good.stdout + good.stderr
        assert good.stdout.splitlines()[-1] == "Result: ALL PASSED"
        assert "L1: POST /sleep?level=1" in good.stdout
        bad = subprocess.run([sys.executable, "-m", "llmuxd", "-c", str(d.config_path),
                              "--validate", "nofree", "--levels", "1"],
                             env=d.env(), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert bad.stdout.splitlines()[-1] == "Result: SOME FAILED"
    finally:
        d.kill()
        shutil.rmtree(d.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# exit codes 2, 3, 4


def test_usage_error_exits_2(daemon: DaemonProcess) -> None:
    r = ctl(daemon, "sleep", "alpha", "--level", "7")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_stopped_daemon_exits_3(tmp_path: Path) -> None:
    tmp = tempfile.mkdtemp(prefix="ctl-s-", dir="/tmp")
    try:
        with DaemonProcess({"alpha": sim(1)}, tmp=tmp) as d:
            ok(d, "status")
            assert d.stop() == 0
            r = ctl(d, "status")
        assert r.returncode == 3
        assert r.stderr.startswith("llmuxctl: llmuxd is not running (")
        assert r.stderr.rstrip().endswith("start it with: systemctl start llmux")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_outsider_is_refused_by_the_socket_mode(daemon: DaemonProcess,
                                                outsider: Outsider) -> None:
    r = outsider.run_ctl("-s", daemon.socket, "status")
    assert r.returncode == 4, r
    assert r.stderr == (f"llmuxctl: permission denied on {daemon.socket}: add yourself to "
                        "group " + group_of(daemon.socket) + " (then log in again)\n")


def test_outsider_is_refused_by_the_daemons_peer_check(outsider: Outsider) -> None:
    """Socket mode 0666: the outsider connects and may read, but not change anything."""
    tmp = make_open_tmp()
    try:
        with DaemonProcess({"alpha": sim(1)}, tmp=tmp,
                           config={"daemon": {"socket_mode": "0666"}}) as d:
            looked = outsider.run_ctl("-s", d.socket, "status")
            assert looked.returncode == 0, looked
            r = outsider.run_ctl("-s", d.socket, "start", "alpha")
            assert r.returncode == 4, r
            assert r.stderr.startswith(f"llmuxctl: permission denied on {d.socket}: ")
            assert d.status("alpha")["state"] == "stopped"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
