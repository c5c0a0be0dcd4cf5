"""A user outside the socket's group gets exit 4 and the hint, never a traceback."""

from __future__ import annotations

from pathlib import Path

from .conftest import Outsider, group_of
from .fake_daemon import FakeDaemon


def test_socket_mode_0660_refuses_an_outsider_with_exit_4(outsider: Outsider,
                                                           open_dir: Path) -> None:
    path = open_dir / "llmuxd.sock"
    with FakeDaemon(str(path)):
        path.chmod(0o660)  # root:root, as llmuxd makes it (root:llmux in production)
        group = group_of(path)
        r = outsider.run_ctl("-s", str(path), "status")
    assert r.returncode == 4, r
    assert r.stderr == (f"llmuxctl: permission denied on {path}: add yourself to group "
                        + group + " (then log in again)\n")
    assert r.stdout == ""


def test_an_unreachable_socket_directory_is_permission_denied_too(outsider: Outsider,
                                                                  open_dir: Path) -> None:
    inner = open_dir / "private"
    inner.mkdir(mode=0o700)
    path = inner / "llmuxd.sock"
    with FakeDaemon(str(path)):
        r = outsider.run_ctl("-s", str(path), "wake", "beta")
    assert r.returncode == 4, r
    assert r.stderr.startswith(f"llmuxctl: permission denied on {path}: add yourself to group")
    assert "Traceback" not in r.stderr


def test_the_outsider_may_use_an_open_socket(outsider: Outsider, open_dir: Path) -> None:
    """The control: the same user, the same fake, mode 0666: it works (exit 0)."""
    path = open_dir / "llmuxd.sock"
    with FakeDaemon(str(path)):
        path.chmod(0o666)
        r = outsider.run_ctl("-s", str(path), "status")
    assert r.returncode == 0, r
    assert "alpha" in r.stdout
