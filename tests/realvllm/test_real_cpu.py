"""Facts about real vLLM on CPU that the simulator deliberately does not copy.

The simulator simulates a GPU box, so it accepts --enable-sleep-mode and frees
(simulated) memory; real vLLM on CPU refuses the flag. This is why llmux has a
per-model `enable_sleep_mode = false` for CPU backends (VLLM_API.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .fixtures import start_real_vllm

pytestmark = pytest.mark.realvllm


def test_real_vllm_on_cpu_refuses_enable_sleep_mode(tmp_path: Path) -> None:
    srv = start_real_vllm(tmp_path, extra_args=["--enable-sleep-mode"], wait=False)
    try:
        code = srv.proc.wait(180)
    finally:
        srv.stop()
    assert code == 1, srv.log()[-3000:]
    assert "Sleep mode is not supported on current platform" in srv.log()
