"""Bash completion: commands, options, levels, and model names from the daemon or config."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, ctl_env
from .fake_daemon import FakeDaemon

COMPLETION = REPO / "llmuxctl" / "completion.bash"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def ctl_bin(short_dir: Path) -> Path:
    """An ``llmuxctl`` executable on PATH that runs this checkout's llmuxctl."""
    bindir = short_dir / "bin"
    bindir.mkdir()
    exe = bindir / "llmuxctl"
    exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m llmuxctl \"$@\"\n")
    exe.chmod(0o755)
    return exe


def complete(line: str, ctl_bin: Path, **env: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end) with our completion loaded."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    script = (f"source {shlex.quote(str(COMPLETION))}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={shlex.quote(line)}\nCOMP_POINT=${{#COMP_LINE}}\n"
              "_llmuxctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    path = f"{ctl_bin.parent}:/usr/bin:/bin"
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=REPO,
                       env=ctl_env(PATH=path, **env), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return sorted(w for w in r.stdout.splitlines() if w)


def test_commands_and_global_options(ctl_bin: Path) -> None:
    assert complete("llmuxctl ", ctl_bin) == sorted(
        ["status", "start", "sleep", "wake", "kill", "switch", "logs", "reload", "validate",
         "version", "fleet"])
    assert complete("llmuxctl s", ctl_bin) == ["sleep", "start", "status", "switch"]
    assert "--socket" in complete("llmuxctl --s", ctl_bin)


def test_fleet_offers_its_generator(ctl_bin: Path) -> None:
    assert complete("llmuxctl fleet ", ctl_bin) == ["haproxy"]
    assert "--check-inter" in complete("llmuxctl fleet haproxy --c", ctl_bin)


def test_command_options_and_levels(ctl_bin: Path) -> None:
    assert complete("llmuxctl sleep --", ctl_bin) == sorted(
        ["--json", "--help", "--level", "--no-wait", "--timeout"])
    assert complete("llmuxctl sleep alpha --level ", ctl_bin) == ["1", "2", "3"]
    assert "--follow" in complete("llmuxctl logs alpha --f", ctl_bin)


def test_model_names_come_from_the_daemon(ctl_bin: Path, fake: FakeDaemon) -> None:
    assert complete("llmuxctl wake ", ctl_bin, LLMUX_SOCKET=fake.path) == ["a", "alpha", "beta"]
    assert complete(f"llmuxctl -s {fake.path} status al", ctl_bin) == ["alpha"]
    # one model for wake: nothing more after it
    assert complete("llmuxctl wake alpha ", ctl_bin, LLMUX_SOCKET=fake.path) == []


def test_model_names_come_from_the_config_without_daemon(ctl_bin: Path,
                                                         short_dir: Path) -> None:
    config = short_dir / "llmux.toml"
    config.write_text(f'[daemon]\nsocket = "{short_dir}/none.sock"\n'
                      '[models.qwen]\nmodel_path = "q"\nport = 8001\n'
                      '[models.gemma]\nmodel_path = "g"\nport = 8002\n')
    assert complete(f"llmuxctl -c {config} switch ", ctl_bin) == ["gemma", "qwen"]
