"""The `backend` fixture: one server per kind for the whole run, the simulator or real vLLM.

The same conformance test code runs against both; real vLLM needs the tier built by
tests/realvllm/setup.sh (and LLMUX_REALVLLM=1, see realvllm/fixtures.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from realvllm.fixtures import MAX_MODEL_LEN, SERVED_NAME, start_real_vllm

from llmux_testkit.sim import SimProcess, init_gpus

# Sim settings that behave like the real tiny model on CPU, with streams long enough
# (50 tokens/s) to be caught mid-way by /sleep, and a quick start.
SIM_ARGS = [
    "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--enforce-eager",
    "--sim-load-s", "0", "--sim-warmup-s", "0.1", "--sim-size-gib", "0.5",
    "--sim-token-rate", "50",
]


@dataclass
class Backend:
    """A running server of either kind, as the tests see it."""

    kind: str  # "sim" | "real"
    url: str
    model: str
    sim: SimProcess | None = None

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        return requests.get(self.url + path, **kw)

    def post(self, path: str, json: object = None, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        return requests.post(self.url + path, json=json, **kw)


# Session scope: one server of each kind for all conformance modules (a real vLLM
# start costs ~45 s of CPU here; the modules leave it awake, see _awake_after).
@pytest.fixture(scope="session", params=["sim", pytest.param("real", marks=pytest.mark.realvllm)])
def backend(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    tmp = tmp_path_factory.mktemp(f"backend-{request.param}")
    if request.param == "sim":
        sim = SimProcess(
            "local/tiny-llama", served_model_name=SERVED_NAME, args=SIM_ARGS,
            gpu_state=init_gpus(tmp / "gpus"), time_scale=1.0, log_path=tmp / "sim.log",
        )
        with sim:
            yield Backend("sim", sim.url, SERVED_NAME, sim)
        return
    srv = start_real_vllm(tmp)
    try:
        yield Backend("real", srv.url, srv.served_name)
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _awake_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """Leave the shared server awake for the next test, whatever this one did."""
    yield
    if "backend" in request.fixturenames:
        be: Backend = request.getfixturevalue("backend")
        try:
            if be.get("/is_sleeping", timeout=30).json().get("is_sleeping"):
                be.post("/wake_up?tags=weights", timeout=60)
                be.post("/collective_rpc", {"method": "reload_weights"}, timeout=120)
                be.post("/wake_up", timeout=60)
        except requests.RequestException:
            pass
