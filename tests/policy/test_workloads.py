"""The simulator's inputs: cost presets agree with vllmsim's timing model; generators."""

from __future__ import annotations

import pytest

from llmuxd.policy.workloads import L1_14B, L2_14B, poisson, rust_profiles
from vllmsim.timing import Timing

RUST_COUNTS = {"single_model": 40, "balanced": 40, "bursty": 40, "dominant": 50,
               "interleave": 60, "surge": 40, "three_model": 60, "random_50": 50,
               "random_100": 100, "random_200": 200, "dominant_95": 80, "heavy_burst": 300}


def test_14b_costs_are_those_of_the_simulators_timing_model():
    t = Timing(size_gib=28.0)
    assert L1_14B.sleep_s == pytest.approx(t.sleep_s(1))
    assert L1_14B.wake_s == pytest.approx(t.wake_s(1))
    assert L2_14B.sleep_s == pytest.approx(t.sleep_s(2))
    assert L2_14B.wake_s == pytest.approx(t.wake_s(2) + t.reload_s())
    assert L1_14B.start_s == pytest.approx(t.start_s())


def test_the_twelve_rust_profiles_have_their_request_counts():
    assert {w.name: len(w.requests) for w in rust_profiles()} == RUST_COUNTS


def test_rust_profiles_serve_one_request_at_a_time_for_half_a_second():
    for w in rust_profiles():
        assert w.max_num_seqs == 1
        assert {r.length for r in w.requests} == {0.5}


def test_poisson_traces_are_deterministic_per_seed():
    a = poisson("x", {"a": 0.5, "b": 0.1}, 600.0, seed=3)
    b = poisson("x", {"a": 0.5, "b": 0.1}, 600.0, seed=3)
    c = poisson("x", {"a": 0.5, "b": 0.1}, 600.0, seed=4)
    assert a == b and a != c
    assert all(0 <= r.arrival < 600.0 for r in a.requests)


def test_policy_options_report_bad_values():
    from llmuxd.policy.options import PolicyOptions
    assert PolicyOptions().errors() == []
    errs = PolicyOptions(max_wait_secs=-1.0, tick_interval_ms=0.0).errors()
    assert errs == ["policy.max_wait_secs must be a number >= 0, got -1.0",
                    "policy.tick_interval_ms must be > 0"]


def test_unknown_policy_type_is_refused_with_the_known_ones():
    from llmuxd.policy import make_policy
    with pytest.raises(ValueError, match="unknown policy_type 'lifo' \\(one of fifo, "
                                          "cost_aware, time_slice, adaptive\\)"):
        make_policy("lifo")


def test_cli_refuses_an_unknown_cost_preset(capsys):
    from llmuxd.policy.simulate import main
    with pytest.raises(SystemExit) as exc:
        main(["--costs", "3s"])
    assert exc.value.code == 2
    assert "unknown cost preset '3s'" in capsys.readouterr().err


def test_cli_prints_a_table(capsys):
    from llmuxd.policy.simulate import main
    assert main(["--family", "rust", "--costs", "2s", "--policies", "adaptive,fifo"]) == 0
    out = capsys.readouterr().out
    assert "| single_model | 2s | adaptive | 40 | 0 |" in out
    assert out.count("| adaptive |") == 12


def test_docs_table_of_the_rust_profiles_is_what_the_cli_prints(capsys):
    # the Poisson half takes ~20 s of CPU; the Rust half is checked on every run
    from pathlib import Path

    from llmuxd.policy.simulate import main
    assert main(["--family", "rust"]) == 0
    printed = capsys.readouterr().out.strip()
    doc = (Path(__file__).parents[2] / "docs" / "scheduling.md").read_text()
    assert printed in doc, "docs/scheduling.md is stale: rerun python -m llmuxd.policy.simulate"
