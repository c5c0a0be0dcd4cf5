"""The Debian package under a real systemd: build, install, run, reload, stop, purge.

Runs when LLMUX_SYSTEMD=1 (needs root, debootstrap, systemd-nspawn, a Debian mirror and
PyPI for the first build; .ci/run sets it). LLMUX_SYSTEMD_RELEASE picks the release
(default bookworm); LLMUX_DEB=path skips the build and tests that .deb.

The tests are steps of one story on one booted container, in file order: each step
records that it passed, and a step whose prerequisite failed is skipped with the name
of that prerequisite, so a report says exactly which steps work.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn_container import Container, wait_until

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(os.environ.get("LLMUX_SYSTEMD") != "1",
                       reason="set LLMUX_SYSTEMD=1 to build the .deb and boot it (root, slow)"),
    pytest.mark.timeout(1800),
]

TOP = Path(__file__).resolve().parents[2]
RELEASE = os.environ.get("LLMUX_SYSTEMD_RELEASE", "bookworm")
SECURITY_TARGET = 2.5
SIM_GPUS = "/var/lib/llmux/simgpu"
PASSED: set[str] = set()
OBSERVED: dict[str, str] = {}


def require(*steps: str) -> None:
    """Skip this step when an earlier one it builds on did not pass."""
    missing = [s for s in steps if s not in PASSED]
    if missing:
        pytest.skip(f"needs the earlier step(s) {', '.join(missing)}")


def model_table(name: str, port: int, sleep_level: int) -> str:
    """A simulated model: 60 % of the one 80 GiB GPU, so two never fit together."""
    return textwrap.dedent(f"""
        [models.{name}]
        model_path = "sim/{name}"
        port = {port}
        sleep_level = {sleep_level}
        gpu_memory_utilization = 0.6
        env = {{ LLMUX_SIM_TIME_SCALE = "0.01", LLMUX_SIM_SIZE_GIB = "4" }}
        """)


TEST_CONFIG = textwrap.dedent(f"""\
    # /etc/llmux.toml of the systemd proof: two simulated models on one simulated GPU.
    port = 3000
    metrics_port = 9090
    vllm_command = "llmux-sim-vllm"

    [daemon]
    gpu_probe = "sim"
    sim_gpu_state = "{SIM_GPUS}"
    """) + model_table("alpha", 8001, 1) + model_table("beta", 8002, 2)

CHAT = textwrap.dedent("""\
    import json, sys, urllib.error, urllib.request
    body = json.dumps({"model": sys.argv[1], "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()
    req = urllib.request.Request("http://127.0.0.1:3000/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            print(json.dumps({"status": resp.status, "body": json.load(resp)}))
    except urllib.error.HTTPError as e:
        print(json.dumps({"status": e.code, "body": e.read().decode(errors="replace")}))
    """)

HEALTH = textwrap.dedent("""\
    import sys, urllib.error, urllib.request
    try:
        with urllib.request.urlopen("http://127.0.0.1:3000" + sys.argv[1], timeout=30) as r:
            print(r.status)
    except urllib.error.HTTPError as e:
        print(e.code)
    except OSError as e:
        print(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
    """)

AUTHED = textwrap.dedent("""\
    import sys, urllib.error, urllib.request
    req = urllib.request.Request("http://127.0.0.1:3000/v1/models",
                                 headers={"Authorization": "Bearer " + sys.argv[1]})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            print(r.status)
    except urllib.error.HTTPError as e:
        print(e.code)
    """)

MODELS = textwrap.dedent("""\
    import json, urllib.request
    with urllib.request.urlopen("http://127.0.0.1:3000/v1/models", timeout=30) as resp:
        print(json.dumps(sorted(m["id"] for m in json.load(resp)["data"])))
    """)


@pytest.fixture(scope="module")
def deb() -> Path:
    """The .deb under test: LLMUX_DEB, or a fresh build for RELEASE."""
    if os.environ.get("LLMUX_DEB"):
        return Path(os.environ["LLMUX_DEB"]).resolve()
    r = subprocess.run([str(TOP / "packaging/deb/build.sh"), RELEASE], timeout=1800,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if os.environ.get("LLMUX_VERBOSE"):
        print(r.stdout)
    assert r.returncode == 0, f"packaging/deb/build.sh {RELEASE} failed:\n{r.stdout[-6000:]}"
    debs = sorted((TOP / "packaging/deb/out" / RELEASE).glob("llmux_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="module")
def container(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted copy of the cached minimal Debian, with the .deb and its deps on disk."""
    cached = subprocess.run([str(TOP / "packaging/deb/chroot.sh"), "test", RELEASE],
                            check=True, timeout=1800, capture_output=True, text=True)
    work = tmp_path_factory.mktemp("systemd")
    with Container(Path(cached.stdout.strip().splitlines()[-1]), work) as box:
        box.prepare([deb])
        box.boot()
        yield box


def llmuxctl_status(box: Container) -> dict[str, Any]:
    r = box.run(["llmuxctl", "status", "--json"])
    status: dict[str, Any] = json.loads(r.stdout)
    return status


def http_status(box: Container, path: str) -> str:
    """GET http://127.0.0.1:3000<path> inside the container: the status, or the error."""
    r = box.run(["/usr/lib/llmux/venv/bin/python", "-c", HEALTH, path], check=False)
    return r.stdout.strip() or r.stderr.strip()[-200:]


def main_pid(box: Container) -> str:
    return box.run(["systemctl", "show", "llmux", "-p", "MainPID", "--value"]).stdout.strip()


def watchdog_stamp(box: Container) -> int:
    """When systemd last saw READY=1 or WATCHDOG=1 (monotonic microseconds)."""
    out = box.run(["systemctl", "show", "llmux", "-p", "WatchdogTimestampMonotonic",
                   "--value"]).stdout.strip()
    return int(out or 0)


def journal(box: Container) -> str:
    return box.run(["journalctl", "-u", "llmux", "--no-pager", "-o", "cat"], check=False).stdout


# -- the package ----------------------------------------------------------------------


def test_lintian_has_no_errors_or_warnings(deb: Path) -> None:
    report = deb.parent / "lintian.txt"
    lines = report.read_text().splitlines()
    bad = [line for line in lines if re.match(r"^[EW]: ", line)]
    assert not bad, "\n".join(bad)


def test_install_with_apt(container: Container) -> None:
    inside = container.debs_inside
    container.run(["apt-get", "install", "-y", "-q", *inside], timeout=600)
    status = container.run(["dpkg-query", "-W", "-f=${Status}", "llmux"]).stdout
    assert status == "install ok installed"
    for tool in ("llmuxd", "llmuxctl", "llmux-sim-vllm"):
        container.run(["test", "-x", f"/usr/bin/{tool}"])
    assert container.run(["id", "-nG", "llmux"]).stdout.split()[0] == "llmux"
    for group in ("video", "render"):
        if container.run(["getent", "group", group], check=False).returncode == 0:
            assert group in container.run(["id", "-nG", "llmux"]).stdout.split()
    owner = container.run(["stat", "-c", "%U:%G %a", "/var/log/llmux", "/var/lib/llmux"])
    assert owner.stdout.split("\n")[:2] == ["llmux:llmux 750", "llmux:llmux 750"]
    # Installed, not enabled or started: the admin configures models first.
    assert container.run(["systemctl", "is-enabled", "llmux"], check=False).stdout.strip() \
        == "disabled"
    assert container.run(["systemctl", "is-active", "llmux"], check=False).stdout.strip() \
        == "inactive"
    conffiles = container.run(["dpkg-query", "-W", "-f=${Conffiles}", "llmux"]).stdout
    assert "/etc/llmux.toml" in conffiles
    # The config may hold secrets: root and group llmux only. The credential file
    # for API keys is root's alone.
    mode = container.run(["stat", "-c", "%U:%G %a", "/etc/llmux.toml", "/etc/llmux/api-keys"])
    assert mode.stdout.split("\n")[:2] == ["root:llmux 640", "root:root 600"]
    for page in ("llmuxd.8", "llmuxctl.1", "llmux.toml.5", "llmux-sim-vllm.1"):
        name, section = page.rsplit(".", 1)
        container.run(["man", "-w", section, name])
    completion = container.run(["bash", "-c", "source /usr/share/bash-completion/completions/"
                                "llmuxctl && complete -p llmuxctl"])
    assert "llmuxctl" in completion.stdout
    PASSED.add("install")


def test_shipped_config_is_valid(container: Container) -> None:
    require("install")
    shipped = (TOP / "etc/llmux.toml").read_text()
    assert container.run(["cat", "/etc/llmux.toml"]).stdout == shipped
    r = container.run(["llmuxd", "-c", "/etc/llmux.toml", "--check-config"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unit_verifies_clean(container: Container) -> None:
    require("install")
    r = container.run(["systemd-analyze", "verify", "llmux.service"], check=False)
    output = r.stdout + r.stderr
    assert r.returncode == 0 and output == "", f"exit {r.returncode}:\n{output}"
    PASSED.add("verify")


def test_security_exposure_within_target(container: Container) -> None:
    require("install")
    r = container.run(["systemd-analyze", "security", "--no-pager", "llmux.service"],
                      check=False)
    m = re.search(r"Overall exposure level for llmux\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security llmux.service ({RELEASE}): {score}")
    assert score <= SECURITY_TARGET, r.stdout


def test_gpu_devices_stay_reachable(container: Container) -> None:
    require("install")
    # No device ACL: any DeviceAllow (explicit, or implied by ProtectClock on some
    # systemd versions) would close /dev/nvidia*, /dev/dri and /dev/kfd to the daemon.
    show = container.run(["systemctl", "show", "llmux", "--all", "-p",
                          "DevicePolicy,DeviceAllow,PrivateDevices"]).stdout
    props = dict(line.split("=", 1) for line in show.strip().splitlines())
    props.setdefault("DeviceAllow", "")  # systemctl leaves an empty list out
    assert props == {"DevicePolicy": "auto", "DeviceAllow": "", "PrivateDevices": "no"}, props


# -- the service ----------------------------------------------------------------------


def test_service_starts_and_notifies_ready(container: Container) -> None:
    require("install")
    container.write("/etc/llmux.toml", TEST_CONFIG)
    container.run(["llmux-sim-vllm", "gpus", "init", SIM_GPUS, "--count", "1",
                   "--total-mib", "81920"])
    container.run(["chown", "-R", "llmux:llmux", SIM_GPUS])
    # Type=notify: `systemctl start` returns once llmuxd has sent READY=1.
    r = container.run(["systemctl", "start", "llmux"], check=False, timeout=300)
    assert r.returncode == 0, f"{r.stderr}\n{journal(container)[-4000:]}"
    # Observed at once, asserted by the next step (so a late READY fails that step alone).
    OBSERVED["health_right_after_start"] = http_status(container, "/health")
    OBSERVED["watchdog_at_start"] = str(watchdog_stamp(container))
    show = container.run(["systemctl", "show", "llmux", "-p",
                          "Type,NotifyAccess,ActiveState,SubState,MainPID,User"]).stdout
    props = dict(line.split("=", 1) for line in show.strip().splitlines())
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["User"] == "llmux"
    failed = container.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    assert failed.stdout.strip() == ""
    sock = container.run(["stat", "-c", "%U:%G %a %F", "/run/llmux/llmuxd.sock"]).stdout
    assert sock.strip() == "llmux:llmux 660 socket"
    PASSED.add("start")


def test_ready_means_the_openai_port_serves(container: Container) -> None:
    require("start")
    assert OBSERVED["health_right_after_start"] == "200", (
        "GET :3000/health right after `systemctl start` returned (READY=1) gave "
        f"{OBSERVED['health_right_after_start']}: READY=1 must wait for the front end")


def test_chat_is_answered_and_a_second_model_switches(container: Container) -> None:
    require("start")
    wait_until(lambda: http_status(container, "/health") == "200", 60, ":3000/health")
    python = "/usr/lib/llmux/venv/bin/python"
    first = json.loads(container.run([python, "-c", CHAT, "alpha"], timeout=180).stdout)
    assert first["status"] == 200, first
    assert first["body"]["choices"][0]["message"]["content"]
    second = json.loads(container.run([python, "-c", CHAT, "beta"], timeout=180).stdout)
    assert second["status"] == 200, second
    models = llmuxctl_status(container)["models"]
    assert models["beta"]["state"] == "active"
    assert models["alpha"]["state"] == "sleeping", models["alpha"]
    assert models["alpha"]["sleep_level"] == 1
    PASSED.add("switch")


def test_logrotate_rotates_the_model_logs(container: Container) -> None:
    require("switch")
    logs = container.run(["ls", "/var/log/llmux"]).stdout.split()
    assert {"alpha.log", "beta.log"} <= set(logs), logs
    r = container.run(["logrotate", "--force", "--verbose", "/etc/logrotate.d/llmux"],
                      check=False)
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stdout + r.stderr
    logs = container.run(["ls", "/var/log/llmux"]).stdout.split()
    assert {"alpha.log.1", "beta.log.1"} <= set(logs), logs


def test_status_text_names_the_active_model(container: Container) -> None:
    require("switch")

    def status_text() -> str:
        return container.run(["systemctl", "show", "llmux", "-p", "StatusText",
                              "--value"]).stdout.strip()

    wait_until(lambda: "beta" in status_text(), 60, "STATUS= naming beta")


def test_watchdog_is_fed(container: Container) -> None:
    require("start")
    assert container.run(["systemctl", "show", "llmux", "-p", "WatchdogUSec",
                          "--value"]).stdout.strip() == "30s"

    # systemd stamps the watchdog when the unit becomes ready; a later stamp is a ping.
    at_start = int(OBSERVED["watchdog_at_start"])
    wait_until(lambda: watchdog_stamp(container) > at_start, 60,
               "a WATCHDOG=1 from llmuxd (pings every WatchdogSec/2)")
    assert container.run(["systemctl", "show", "llmux", "-p", "NRestarts",
                          "--value"]).stdout.strip() == "0"


def test_llmuxctl_status_needs_group_llmux(container: Container) -> None:
    require("start")
    container.run(["useradd", "--create-home", "--groups", "llmux", "operator1"])
    container.run(["useradd", "--create-home", "outsider1"])
    inside = container.run(["llmuxctl", "status"], user="operator1", check=False)
    assert inside.returncode == 0, inside.stderr
    assert "alpha" in inside.stdout and "beta" in inside.stdout
    outside = container.run(["llmuxctl", "status"], user="outsider1", check=False)
    assert outside.returncode == 4, (outside.returncode, outside.stdout, outside.stderr)
    assert "llmux" in outside.stderr  # the hint names the group


def test_reload_applies_an_added_model(container: Container) -> None:
    require("start")
    pid_before = main_pid(container)
    container.write("/etc/llmux.toml", TEST_CONFIG + model_table("gamma", 8003, 3))
    container.run(["systemctl", "reload", "llmux"], timeout=120)
    wait_until(lambda: "gamma" in llmuxctl_status(container)["models"], 120,
               "gamma in llmuxctl status after reload")
    python = "/usr/lib/llmux/venv/bin/python"
    listed = json.loads(container.run([python, "-c", MODELS]).stdout)
    assert {"alpha", "beta", "gamma"} <= set(listed)
    assert main_pid(container) == pid_before, "reload must not restart the daemon"
    assert container.run(["systemctl", "is-active", "llmux"]).stdout.strip() == "active"


def test_reload_refuses_an_invalid_config(container: Container) -> None:
    require("start")
    pid_before = main_pid(container)
    good = container.run(["cat", "/etc/llmux.toml"]).stdout
    container.write("/etc/llmux.toml", good + model_table("delta", 8004, 7))
    try:
        r = container.run(["systemctl", "reload", "llmux"], check=False, timeout=120)
        assert r.returncode != 0, "reload of an invalid config must fail"
        assert "models.delta.sleep_level" in journal(container)
        assert container.run(["systemctl", "is-active", "llmux"]).stdout.strip() == "active"
        assert main_pid(container) == pid_before
        assert "delta" not in llmuxctl_status(container)["models"]
    finally:
        container.write("/etc/llmux.toml", good)


def test_killed_daemon_is_restarted_without_orphans(container: Container) -> None:
    require("switch")
    before = main_pid(container)
    children = {pid for pid, _ in container.processes("llmux-sim-vllm")}
    assert children, "the switch step left simulated vLLM children running"
    container.run(["systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", "llmux"])
    # Restart=on-failure (RestartSec=5s): a new llmuxd, and KillMode=control-group took
    # the old children with the old one.
    wait_until(lambda: main_pid(container) not in ("0", before), 90, "a restarted llmuxd")
    wait_until(lambda: container.run(["systemctl", "is-active", "llmux"], check=False)
               .stdout.strip() == "active", 90, "llmux active again")
    assert not children & {pid for pid, _ in container.processes("llmux-sim-vllm")}
    assert container.run(["systemctl", "show", "llmux", "-p", "NRestarts",
                          "--value"]).stdout.strip() == "1"


def test_upgrade_in_place_restarts_the_running_service(container: Container) -> None:
    require("start")
    before = main_pid(container)
    # An admin's dpkg-statoverride on the config outlives an upgrade.
    container.run(["dpkg-statoverride", "--update", "--add", "root", "llmux", "0440",
                   "/etc/llmux.toml"])
    try:
        container.run(["dpkg", "-i", *container.debs_inside], timeout=600)
        assert container.run(["stat", "-c", "%U:%G %a", "/etc/llmux.toml"]).stdout.strip() \
            == "root:llmux 440"
    finally:
        container.run(["dpkg-statoverride", "--remove", "/etc/llmux.toml"])
        container.run(["chmod", "0640", "/etc/llmux.toml"])
    assert container.run(["dpkg-query", "-W", "-f=${Status}", "llmux"]).stdout \
        == "install ok installed"
    # postinst try-restarts a running llmux; it comes back ready.
    assert container.run(["systemctl", "is-active", "llmux"], check=False).stdout.strip() \
        == "active"
    assert main_pid(container) not in ("0", before)
    wait_until(lambda: http_status(container, "/health") == "200", 60, ":3000/health")


def test_api_keys_come_from_the_systemd_credential(container: Container) -> None:
    require("start")
    container.write("/etc/llmux/api-keys", "# keys\nsk-cred-one\n\nsk-cred-two\n")
    container.run(["chmod", "0600", "/etc/llmux/api-keys"])
    config = TEST_CONFIG.replace(
        "[daemon]", '[proxy]\napi_keys_file = "$CREDENTIALS_DIRECTORY/api-keys"\n\n[daemon]')
    container.write("/etc/llmux.toml", config)
    try:
        container.run(["systemctl", "restart", "llmux"], timeout=300)
        wait_until(lambda: http_status(container, "/health") == "200", 60, ":3000/health")
        # The credential is the service's private copy, not readable by others.
        pid = main_pid(container)
        env = container.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
        creds = next(e.split("=", 1)[1] for e in env if e.startswith("CREDENTIALS_DIRECTORY="))
        mode = container.run(["stat", "-c", "%a", f"{creds}/api-keys"]).stdout.strip()
        assert int(mode, 8) & 0o007 == 0, mode
        assert http_status(container, "/v1/models") == "401"
        python = "/usr/lib/llmux/venv/bin/python"
        for key in ("sk-cred-one", "sk-cred-two"):
            r = container.run([python, "-c", AUTHED, key])
            assert r.stdout.strip() == "200", r.stdout + r.stderr
        assert container.run([python, "-c", AUTHED, "sk-wrong"]).stdout.strip() == "401"
        # --check-config as the admin runs it: the keys are not printed.
        out = container.run(["env", "CREDENTIALS_DIRECTORY=/etc/llmux", "llmuxd", "-c",
                             "/etc/llmux.toml", "--check-config"]).stdout
        assert "sk-cred" not in out and "<redacted>" in out
    finally:
        container.write("/etc/llmux.toml", TEST_CONFIG)
        container.run(["systemctl", "restart", "llmux"], timeout=300)
        wait_until(lambda: http_status(container, "/health") == "200", 60, ":3000/health")


def test_journal_priorities_follow_log_levels(container: Container) -> None:
    require("start")
    # Provoke a warning: a reload that changes metrics_port (needs a restart).
    container.write("/etc/llmux.toml", TEST_CONFIG.replace("metrics_port = 9090",
                                                           "metrics_port = 9091"))
    try:
        container.run(["systemctl", "reload", "llmux"], timeout=120)
        wait_until(lambda: "reload_needs_restart" in container.run(
            ["journalctl", "-u", "llmux", "-p", "warning", "--no-pager", "-o", "cat"],
            check=False).stdout, 60, "the reload_needs_restart warning at priority warning")
    finally:
        container.write("/etc/llmux.toml", TEST_CONFIG)
        container.run(["systemctl", "reload", "llmux"], timeout=120)
    warnings = container.run(["journalctl", "-u", "llmux", "-p", "warning", "--no-pager",
                              "-o", "json"]).stdout
    levels = set()
    for line in warnings.splitlines():
        entry = json.loads(line)
        assert int(entry["PRIORITY"]) <= 4, entry
        message = entry.get("MESSAGE", "")
        if isinstance(message, str) and message.startswith("{"):
            levels.add(json.loads(message)["level"])
    assert levels and levels <= {"warning", "error", "critical"}, levels
    # Info lines are in the journal, at priority info, and not in -p warning.
    infos = container.run(["journalctl", "-u", "llmux", "-p", "info..info", "--no-pager",
                           "-o", "cat"]).stdout
    assert '"level": "info"' in infos
    assert '"level": "info"' not in container.run(
        ["journalctl", "-u", "llmux", "-p", "warning", "--no-pager", "-o", "cat"]).stdout


def test_stop_leaves_no_process(container: Container) -> None:
    require("start")
    container.run(["systemctl", "stop", "llmux"], timeout=300)
    assert container.run(["systemctl", "is-active", "llmux"], check=False).stdout.strip() \
        == "inactive"
    left = [p for needle in ("llmuxd", "llmux-sim-vllm", "gunicorn")
            for p in container.processes(needle)
            if "nsenter" not in p[1] and "systemctl" not in p[1]]
    assert left == []
    failed = container.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    assert failed.stdout.strip() == ""
    text = journal(container)
    at = text.find("Traceback")
    assert at < 0, text[max(0, at - 3000):at + 3000]


# -- removal --------------------------------------------------------------------------


def test_remove_keeps_the_config_and_a_reinstall_runs(container: Container) -> None:
    require("start")
    config = container.run(["cat", "/etc/llmux.toml"]).stdout
    container.run(["dpkg", "--remove", "llmux"], timeout=300)
    assert container.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "llmux"]) \
        .stdout.strip() == "rc"
    assert container.run(["test", "!", "-e", "/usr/lib/llmux"], check=False).returncode == 0
    assert container.run(["cat", "/etc/llmux.toml"]).stdout == config
    container.run(["dpkg", "-i", *container.debs_inside], timeout=600)
    assert container.run(["cat", "/etc/llmux.toml"]).stdout == config
    container.run(["systemctl", "start", "llmux"], timeout=300)
    assert container.run(["systemctl", "is-active", "llmux"]).stdout.strip() == "active"
    container.run(["systemctl", "stop", "llmux"], timeout=300)


def test_purge_removes_everything(container: Container) -> None:
    require("install")
    container.run(["systemctl", "stop", "llmux"], check=False, timeout=300)
    container.run(["dpkg", "--purge", "llmux"], timeout=300)
    status = container.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "llmux"],
                           check=False).stdout.strip()
    assert status in ("", "un", "pn")
    for path in ("/usr/lib/llmux", "/usr/bin/llmuxd", "/usr/bin/llmuxctl",
                 "/usr/bin/llmux-sim-vllm", "/etc/llmux.toml", "/etc/logrotate.d/llmux",
                 "/var/log/llmux", "/var/lib/llmux", "/lib/systemd/system/llmux.service",
                 "/usr/lib/systemd/system/llmux.service"):
        assert container.run(["test", "!", "-e", path], check=False).returncode == 0, path
    units = container.run(["systemctl", "list-unit-files", "--no-legend", "llmux.service"],
                          check=False).stdout
    assert units.strip() == ""
    failed = container.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    assert failed.stdout.strip() == ""
    assert container.processes("llmux") == []
