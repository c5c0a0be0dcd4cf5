"""The policy simulator's table: adaptive against the others (deterministic, virtual time).

These are results of seeded simulations in virtual time, not timing thresholds: the
same numbers come out on any machine. A cell is *feasible* when one round over the
other models' switches fits in the wait bound ((models - 1) x switch <= max_wait);
in an infeasible cell no policy can keep the bound and they trade switches for
timeouts (docs/scheduling.md shows those rows too).
"""

from __future__ import annotations

import math
from functools import cache

import pytest

from llmuxd.policy.base import Deactivate, ModelView, PolicyInput
from llmuxd.policy.fifo import FifoPolicy
from llmuxd.policy.options import PolicyOptions
from llmuxd.policy.simulate import RUST_CONFIG, Result, SimConfig, Simulation, simulate
from llmuxd.policy.workloads import COSTS, Request, Workload, poisson_workloads, rust_profiles

POLICIES = ("fifo", "cost_aware", "time_slice", "adaptive")
MAX_WAIT = PolicyOptions().max_wait_secs
RUST = {w.name: w for w in rust_profiles()}
POISSON = {w.name: w for w in poisson_workloads(duration=1200.0)}
CELLS = ([("rust", w, c) for w in RUST for c in ("2s", "5s", "10s", "20s")]
         + [("poisson", w, c) for w in POISSON for c in ("14B-L1", "14B-L2", "2s", "5s")])


@cache
def run(family: str, workload: str, cost: str, policy: str) -> Result:
    w = RUST[workload] if family == "rust" else POISSON[workload]
    base = RUST_CONFIG if family == "rust" else SimConfig()
    cfg = SimConfig(policy, base.options, base.drain_before_switch, base.min_active_secs,
                    base.drain_timeout_secs, base.request_timeout_secs)
    return simulate(w, COSTS[cost], cfg)


def feasible(family: str, workload: str, cost: str) -> bool:
    w = RUST[workload] if family == "rust" else POISSON[workload]
    c = COSTS[cost]
    return (len(w.models) - 1) * (c.sleep_s + c.wake_s) <= MAX_WAIT


def ids(cell: tuple[str, str, str]) -> str:
    return "-".join(cell)


@pytest.mark.parametrize("cell", CELLS, ids=ids)
def test_adaptive_serves_the_gpu_at_least_as_well_as_the_better_rust_policy(cell):
    a = run(*cell, "adaptive")
    best = max(run(*cell, "cost_aware").serving_pct, run(*cell, "time_slice").serving_pct)
    assert a.serving_pct >= best - 1.0, f"adaptive {a.serving_pct:.1f} % < {best:.1f} %"


@pytest.mark.parametrize("cell", CELLS, ids=ids)
def test_adaptive_throughput_at_least_the_better_rust_policy(cell):
    a = run(*cell, "adaptive")
    best = max(run(*cell, "cost_aware").throughput, run(*cell, "time_slice").throughput)
    assert a.throughput >= best * 0.99, f"adaptive {a.throughput:.4f}/s < {best:.4f}/s"


@pytest.mark.parametrize("cell", [c for c in CELLS if feasible(*c)], ids=ids)
def test_adaptive_switches_no_more_than_fifo_where_the_bound_is_feasible(cell):
    a, f = run(*cell, "adaptive"), run(*cell, "fifo")
    assert a.switches <= f.switches, f"adaptive {a.switches} > fifo {f.switches}"


@pytest.mark.parametrize("cell", [c for c in CELLS if feasible(*c) and c[1] != "long"],
                         ids=ids)
def test_adaptive_wait_bound_where_feasible(cell):
    # wait until the lease <= max_wait + the switch that admitted it + one more switch
    # (a request that arrives while its own model is being switched out waits for it)
    a = run(*cell, "adaptive")
    for name, m in a.per_model.items():
        assert m.timed_out == 0, f"{name}: {m.timed_out} timed out"
        assert m.max_excess <= MAX_WAIT + a.longest_switch_s + 1e-6, \
            f"{name}: waited {m.max_excess:.1f} s beyond its switch"


def test_adaptive_has_fewer_switches_than_fifo_on_contended_traffic():
    for cost in ("14B-L1", "2s"):
        for w in ("even", "skewed", "five"):
            a, f = run("poisson", w, cost, "adaptive"), run("poisson", w, cost, "fifo")
            assert a.switches < f.switches, (w, cost, a.switches, f.switches)


def test_trickle_request_under_a_flood_waits_at_most_max_wait_plus_its_switch():
    for cost in ("14B-L1", "2s", "5s"):
        m = run("poisson", "trickle", cost, "adaptive").per_model["trickle"]
        assert m.completed > 0 and m.timed_out == 0
        assert m.max_excess <= MAX_WAIT + 1e-6, (cost, m.max_excess)


def test_simulation_is_deterministic():
    a = run("poisson", "skewed", "2s", "adaptive")
    b = simulate(POISSON["skewed"], COSTS["2s"], SimConfig("adaptive"))
    assert (a.completed, a.switches, a.serving_s, a.per_model["a"].latencies) == \
        (b.completed, b.switches, b.serving_s, b.per_model["a"].latencies)


# -- the review's defects, through the simulator ------------------------------------

LONG_ALTERNATING = Workload(
    "alternating", ("a", "b"),
    tuple(Request("ab"[i % 2], 3.0 * i, 20.0) for i in range(20)))


def test_fifo_without_drain_and_min_active_zero_completes_every_request():
    cfg = SimConfig("fifo", drain_before_switch=False, min_active_secs=0.0,
                    request_timeout_secs=math.inf)
    r = simulate(LONG_ALTERNATING, COSTS["2s"], cfg)
    assert sum(m.cut for m in r.per_model.values()) == 0
    assert r.completed == 20


class _SeedFifo(FifoPolicy):
    """The seed's fifo: evicts at once and honours drain=false under leases in flight."""

    def leave_at(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> float:
        since = victim.active_since if victim.active_since is not None else inp.now
        return since + inp.min_active_secs

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        return Deactivate(victim.name, victim.sleep_level, inp.drain_before_switch,
                          f"making room for {target.name}", for_model=target.name)


def seed_fifo(w: Workload, cost: str, cfg: SimConfig) -> Result:
    sim = Simulation(w, COSTS[cost], cfg)
    sim.policy = _SeedFifo()
    return sim.run()


def test_fifo_switches_less_than_the_seeds_one_batch_per_switch():
    for w in ("even", "skewed", "five"):
        fixed = run("poisson", w, "5s", "fifo")
        seed = seed_fifo(POISSON[w], "5s", SimConfig("fifo"))
        assert fixed.switches < seed.switches, (w, fixed.switches, seed.switches)


def test_the_seeds_fifo_livelocks_in_the_simulator():
    # what the two fifo tests above guard against: requests cut by sleeps under them
    cfg = SimConfig("fifo", drain_before_switch=False, min_active_secs=0.0,
                    request_timeout_secs=math.inf)
    r = seed_fifo(LONG_ALTERNATING, "2s", cfg)
    assert sum(m.cut for m in r.per_model.values()) > 0
