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
