"""Unit tests of the simulator's pure parts: faults, timing, text, options."""

from __future__ import annotations

import pytest

from vllmsim import textgen
from vllmsim.faults import FAULTS, FaultError, Faults, parse_fault
from vllmsim.options import OptionsError, parse_serve, visible_gpus
from vllmsim.timing import Timing, size_from_model_name

# -- faults ------------------------------------------------------------------------------


def test_every_documented_fault_parses() -> None:
    expected = {"crash_at_start", "never_healthy", "slow_start", "sleep_500", "sleep_hang",
                "sleep_no_free", "wake_500", "reload_fail", "die_mid_stream",
                "ignore_sigterm", "exit_after"}
    assert set(FAULTS) == expected
    assert parse_fault("sleep_500") == ("sleep_500", True)
    assert parse_fault("slow_start=2.5") == ("slow_start", 2.5)
    assert parse_fault("die_mid_stream=3") == ("die_mid_stream", 3)


@pytest.mark.parametrize("text", ["nope", "slow_start", "exit_after=x", "sleep_500=3",
                                  "exit_after=-1"])
def test_bad_fault_specs_are_refused(text: str) -> None:
    with pytest.raises(FaultError):
        parse_fault(text)


def test_runtime_fault_update_is_all_or_nothing() -> None:
    f = Faults(["sleep_500"])
    with pytest.raises(FaultError):
        f.update({"wake_500": True, "bogus": True}, [])
    assert f.as_dict() == {"sleep_500": True}
    f.update({"exit_after": 4, "sleep_500": False}, [])
    assert f.as_dict() == {"exit_after": 4}
    f.update({}, ["exit_after"])
    assert f.as_dict() == {}


# -- timing ------------------------------------------------------------------------------


def test_timing_model_formulas() -> None:
    t = Timing(size_gib=28, d2h_gibps=14, h2d_gibps=7, disk_gibps=2, warmup_s=10,
               token_rate=100, scale=1.0)
    assert t.start_s() == pytest.approx(28 / 2 + 10)
    assert t.sleep_s(1) == pytest.approx(2.0)
    assert t.wake_s(1) == pytest.approx(4.0)
    assert t.reload_s() == pytest.approx(28 / 2 + 28 / 7)
    assert t.token_interval_s() == pytest.approx(0.01)
    assert t.sleep_s(0) == 0.0


def test_time_scale_multiplies_every_duration() -> None:
    t = Timing(size_gib=10, scale=0.5)
    full = Timing(size_gib=10)
    assert t.start_s() == pytest.approx(full.start_s() / 2)
    assert t.wake_s(1) == pytest.approx(full.wake_s(1) / 2)
    assert t.token_interval_s() == pytest.approx(full.token_interval_s() / 2)


@pytest.mark.parametrize(("name", "gib"), [
    ("Qwen/Qwen3-14B", 28.0), ("meta-llama/Llama-3.1-8B-Instruct", 16.0),
    ("Qwen/Qwen2.5-0.5B", 1.0), ("local/tiny-llama", 2.0), ("org/model-v2b3", 2.0),
])
def test_size_hint_from_model_name(name: str, gib: float) -> None:
    assert size_from_model_name(name) == gib


# -- text --------------------------------------------------------------------------------


def _text(model: str = "m", prompt: str = "p", **kw: object) -> str:
    args: dict[str, object] = {"max_tokens": 30, "temperature": 0.0, "seed": None,
                               "chat": False, "garbage": False}
    args.update(kw)
    return "".join(textgen.plan(model, prompt, **args).tokens)  # type: ignore[arg-type]


def test_text_is_deterministic_per_model_prompt_seed() -> None:
    assert _text() == _text()
    assert _text(model="a") != _text(model="b")
    assert _text(prompt="x") != _text(prompt="y")
    assert _text(temperature=0.8, seed=7) == _text(temperature=0.8, seed=7)
    assert _text(seed=1) != _text(seed=2)


def test_max_tokens_caps_the_output_with_finish_length() -> None:
    g = textgen.plan("m", "p", max_tokens=3, temperature=0, seed=None, chat=True, garbage=False)
    assert (len(g.tokens), g.finish_reason) == (3, "length")


def test_ignore_eos_runs_to_max_tokens_with_finish_length() -> None:
    g = textgen.plan("m", "p", max_tokens=200, temperature=0, seed=None, chat=False,
                     garbage=False, ignore_eos=True)
    assert (len(g.tokens), g.finish_reason) == (200, "length")


def test_garbage_after_l2_wake_is_bangs() -> None:
    assert set(_text(garbage=True)) == {"!"}


def test_embedding_is_a_deterministic_unit_vector() -> None:
    a = textgen.embedding("m", "hello", 64)
    assert a == textgen.embedding("m", "hello", 64)
    assert a != textgen.embedding("other", "hello", 64)
    assert sum(v * v for v in a) == pytest.approx(1.0)


# -- options -----------------------------------------------------------------------------


def test_vllm_flags_and_unknown_flags_are_accepted() -> None:
    o = parse_serve(["Qwen/Qwen3-14B", "--host", "0.0.0.0", "--port", "8001",
                     "--enable-sleep-mode", "--gpu-memory-utilization", "0.5",
                     "--tensor-parallel-size", "2", "--dtype", "bfloat16",
                     "--served-model-name", "qwen", "--max-num-seqs", "64", "--trust-remote-code"],
                    env={})
    assert (o.host, o.port, o.enable_sleep_mode, o.gpu_memory_utilization) == (
        "0.0.0.0", 8001, True, 0.5)
    assert (o.tensor_parallel_size, o.dtype, o.model_name) == (2, "bfloat16", "qwen")
    assert o.unknown_args == ["--max-num-seqs", "64", "--trust-remote-code"]
    assert o.timing.size_gib == 28.0


def test_sim_knobs_from_env_and_flags_win() -> None:
    env = {"LLMUX_SIM_TIME_SCALE": "0.1", "LLMUX_SIM_SIZE_GIB": "3", "LLMUX_SIM_FAULTS":
           "sleep_500, exit_after=2", "LLMUX_SIM_FAULT_API": "1", "VLLM_SERVER_DEV_MODE": "1",
           "LLMUX_SIM_GPU_STATE": "/tmp/x"}
    o = parse_serve(["m", "--sim-size-gib", "5", "--sim-fault", "wake_500"], env=env)
    assert o.timing.scale == 0.1
    assert o.timing.size_gib == 5.0
    assert o.faults.as_dict() == {"wake_500": True, "sleep_500": True, "exit_after": 2}
    assert (o.fault_api, o.dev_mode, o.gpu_state) == (True, True, "/tmp/x")


@pytest.mark.parametrize("argv", [["m", "--sim-fault", "bogus"], ["m", "--sim-disk-gibps", "0"],
                                  ["m", "--gpu-memory-utilization", "1.5"]])
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(OptionsError):
        parse_serve(argv, env={})


def test_bad_env_value_is_refused() -> None:
    with pytest.raises(OptionsError, match="LLMUX_SIM_TIME_SCALE"):
        parse_serve(["m"], env={"LLMUX_SIM_TIME_SCALE": "fast"})


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    o = parse_serve(["m", "-tp", "2"], env={})
    assert visible_gpus(o, {}) == [0, 1]
    assert visible_gpus(o, {"CUDA_VISIBLE_DEVICES": "3,1,2"}) == [3, 1]
    assert visible_gpus(parse_serve(["m"], env={}), {"CUDA_VISIBLE_DEVICES": "2"}) == [2]
