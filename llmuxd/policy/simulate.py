"""A deterministic discrete-event simulator that drives the production policies.

``simulate(workload, costs, config)`` replays a request trace in virtual time
against a model of one GPU box: the same ``PolicyInput`` the daemon builds, the
same policy objects (``make_policy``), and a model of what the planner and vLLM do
with the decisions:

* vLLM serves up to ``max_num_seqs`` requests at once, each for its own length
  (batching: a request that arrives for the active model starts at once); more
  wait inside vLLM, in order;
* a switch out is a drain (gate closed; in-flight requests finish, or are cut at
  the drain deadline) and then a sleep at the model's level; a switch in is a wake
  (or a cold start after level 3); the GPU holds one model at a time (every model
  at 0.9 of GPU 0, placement decides as in the daemon);
* a request waiting at the gate longer than ``request_timeout_secs`` gets a 504.

Time is *virtual*: the results are the same on any machine, so tests can assert on
them. ``python -m llmuxd.policy.simulate`` prints the table of docs/scheduling.md.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmuxd.policy import POLICY_TYPES, make_policy
from llmuxd.policy.base import Activate, Deactivate, ModelView, PolicyInput
from llmuxd.policy.options import PolicyOptions
from llmuxd.policy.workloads import (
    COSTS,
    Costs,
    Request,
    Workload,
    poisson_workloads,
    rust_profiles,
)
from llmuxd.states import ModelState

S = ModelState
COST_ALPHA = 0.3          # the daemon's switch-cost EMA weight (supervisor.COST_ALPHA)
EPS = 1e-9


@dataclass(frozen=True)
class SimConfig:
    """The daemon settings the simulation stands for."""

    policy: str = "adaptive"
    options: PolicyOptions = field(default_factory=PolicyOptions)
    drain_before_switch: bool = True
    min_active_secs: float = 0.0
    drain_timeout_secs: float = 30.0
    request_timeout_secs: float = 60.0


@dataclass
class ModelResult:
    completed: int = 0
    cut: int = 0                 # aborted at a drain deadline (or slept under)
    timed_out: int = 0           # 504 at the gate
    latencies: list[float] = field(default_factory=list)   # arrival -> completion
    max_wait: float = 0.0        # arrival -> running in vLLM (or 504/end)
    max_gate_wait: float = 0.0   # arrival -> lease granted (the policy's part of the wait)
    max_excess: float = 0.0      # max over requests of gate wait - the switch that admitted it

    def pct(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


@dataclass
class Result:
    workload: str
    policy: str
    costs: str
    per_model: dict[str, ModelResult]
    switches: int = 0
    serving_s: float = 0.0
    switching_s: float = 0.0
    end: float = 0.0
    window: float | None = None     # open-loop arrival window (throughput's denominator)
    longest_switch_s: float = 0.0   # drain + sleep + wake of the longest switch

    @property
    def completed(self) -> int:
        return sum(m.completed for m in self.per_model.values())

    @property
    def throughput(self) -> float:
        """Completed requests per second: of the arrival window for open-loop traffic
        (every policy is then judged over the same time), else until the last completion."""
        span = self.window or self.end
        return self.completed / span if span > 0 else 0.0

    @property
    def serving_pct(self) -> float:
        total = self.serving_s + self.switching_s
        return 100.0 * self.serving_s / total if total > 0 else 100.0

    @property
    def switches_per_hour(self) -> float:
        return self.switches * 3600.0 / self.end if self.end > 0 else 0.0

    @property
    def max_wait(self) -> float:
        return max((m.max_wait for m in self.per_model.values()), default=0.0)

    @property
    def failed(self) -> int:
        return sum(m.cut + m.timed_out for m in self.per_model.values())


@dataclass
class _Switch:
    started: float
    from_: str | None
    drain_s: float = 0.0
    sleep_s: float = 0.0


@dataclass
class _Model:
    name: str
    costs: Costs
    max_num_seqs: int
    state: ModelState = S.SLEEPING
    op_end: float | None = None          # busy until then (wake, start, sleep)
    op_kind: str = ""
    active_since: float | None = None
    idle_since: float | None = None
    switched_in: float = 0.0
    gate: deque[Request] = field(default_factory=deque)
    running: list[tuple[float, int, Request]] = field(default_factory=list)  # heap by end
    vqueue: deque[tuple[Request, float]] = field(default_factory=deque)  # (req, admitted)
    drain_deadline: float | None = None
    drain_started: float = 0.0
    switch: _Switch | None = None        # the switch that will make this model active
    pending_from: _Switch | None = None  # the switch this model is leaving for

    @property
    def busy(self) -> bool:
        return self.op_end is not None

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.vqueue)


class Simulation:
    """One run: a workload, a cost preset, a configuration."""

    def __init__(self, workload: Workload, costs: Costs, config: SimConfig) -> None:
        self.w, self.c, self.cfg = workload, costs, config
        self.policy = make_policy(config.policy)
        self.models = {n: _Model(n, costs, workload.max_num_seqs) for n in workload.models}
        self.costs: dict[tuple[str | None, str], float] = {}
        self.result = Result(workload.name, config.policy, costs.name,
                             {n: ModelResult() for n in workload.models})
        self.now = 0.0
        self.recheck: float | None = None
        self.seq = 0

    # -- the run ------------------------------------------------------------

    def run(self) -> Result:
        arrivals = list(self.w.requests)
        i = 0
        last_done = 0.0
        guard = 0
        while True:
            nxt = self._next_time(arrivals[i].arrival if i < len(arrivals) else None)
            if nxt is None:
                break
            self._account(nxt)
            self.now = nxt
            last_done = max(last_done, self._step_ops_and_completions())
            while i < len(arrivals) and arrivals[i].arrival <= self.now + EPS:
                self._arrive(arrivals[i])
                i += 1
            self._timeouts()
            self._decide_until_stable()
            guard += 1
            if guard > 5_000_000:
                raise RuntimeError("simulation does not progress")
        self.result.end = max(last_done, self.now)
        self.result.window = self.w.duration
        return self.result

    def _next_time(self, arrival: float | None) -> float | None:
        cands: list[float] = []
        if arrival is not None:
            cands.append(arrival)
        for m in self.models.values():
            if m.op_end is not None:
                cands.append(m.op_end)
            if m.running:
                cands.append(m.running[0][0])
            if m.state is S.DRAINING and not m.busy and m.drain_deadline is not None \
                    and m.in_flight:
                cands.append(m.drain_deadline)
            if m.gate:
                cands.append(m.gate[0].arrival + self.cfg.request_timeout_secs)
        if self.recheck is not None and any(m.gate for m in self.models.values()):
            cands.append(max(self.recheck, self.now))
        if not cands:
            return None
        return max(min(cands), self.now)

    def _account(self, until: float) -> None:
        dt = until - self.now
        if dt <= 0:
            return
        # serving = generating for someone (a drain still serves); an idle active
        # model counts neither way, so holding an idle model earns no credit
        serving = any(m.state in (S.ACTIVE, S.DRAINING) and not m.busy and m.in_flight
                      for m in self.models.values())
        switching = any(m.busy for m in self.models.values())
        if serving:
            self.result.serving_s += dt
        elif switching:
            self.result.switching_s += dt

    # -- requests -------------------------------------------------------------

    def _arrive(self, r: Request) -> None:
        m = self.models[r.model]
        if m.state is S.ACTIVE and not m.busy:
            self._admit(m, r, 0.0)
        else:
            m.gate.append(r)

    def _admit(self, m: _Model, r: Request, switch_total: float) -> None:
        res = self.result.per_model[m.name]
        gate_wait = self.now - r.arrival
        res.max_gate_wait = max(res.max_gate_wait, gate_wait)
        res.max_excess = max(res.max_excess, gate_wait - switch_total)
        if len(m.running) < m.max_num_seqs:
            self._run(m, r, switch_total)
        else:
            m.vqueue.append((r, switch_total))
        m.idle_since = None

    def _run(self, m: _Model, r: Request, switch_total: float) -> None:
        wait = self.now - r.arrival
        res = self.result.per_model[m.name]
        res.max_wait = max(res.max_wait, wait)
        self.seq += 1
        heapq.heappush(m.running, (self.now + r.length, self.seq, r))

    def _timeouts(self) -> None:
        limit = self.cfg.request_timeout_secs
        for m in self.models.values():
            res = self.result.per_model[m.name]
            while m.gate and self.now - m.gate[0].arrival >= limit - EPS:
                m.gate.popleft()
                res.timed_out += 1
                res.max_wait = max(res.max_wait, limit)
                res.max_gate_wait = max(res.max_gate_wait, limit)
                res.max_excess = max(res.max_excess, limit)

    def _cut_all(self, m: _Model) -> None:
        res = self.result.per_model[m.name]
        res.cut += m.in_flight
        m.running.clear()
        m.vqueue.clear()

    # -- operations -----------------------------------------------------------

    def _step_ops_and_completions(self) -> float:
        last = 0.0
        for m in self.models.values():
            while m.running and m.running[0][0] <= self.now + EPS:
                end, _, r = heapq.heappop(m.running)
                res = self.result.per_model[m.name]
                res.completed += 1
                res.latencies.append(end - r.arrival)
                last = max(last, end)
                while m.vqueue and len(m.running) < m.max_num_seqs:
                    q, total = m.vqueue.popleft()
                    self._run(m, q, total)
            if m.op_end is not None and m.op_end <= self.now + EPS:
                self._op_done(m)
            if m.state is S.DRAINING and not m.busy and (
                    m.in_flight == 0 or (m.drain_deadline is not None
                                         and self.now >= m.drain_deadline - EPS)):
                self._begin_sleep(m)
            if m.state is S.ACTIVE and not m.busy and m.in_flight == 0 and not m.gate:
                if m.idle_since is None:
                    m.idle_since = self.now
            else:
                m.idle_since = None
        return last

    def _begin_sleep(self, m: _Model) -> None:
        if m.in_flight:
            self._cut_all(m)
        if m.pending_from is not None:
            m.pending_from.drain_s = self.now - m.drain_started
        m.drain_deadline = None
        m.op_kind = "sleep"
        m.op_end = self.now + m.costs.sleep_s

    def _op_done(self, m: _Model) -> None:
        kind, m.op_end, m.op_kind = m.op_kind, None, ""
        if kind == "sleep":
            m.state = S.SLEEPING
            m.active_since = None
            if m.pending_from is not None:
                m.pending_from.sleep_s = m.costs.sleep_s
                m.pending_from = None
            return
        # wake or start: ACTIVE, the gate opens
        m.state = S.ACTIVE
        m.active_since = self.now
        sw = m.switch
        m.switch = None
        wake = m.costs.wake_s if kind == "wake" else m.costs.start_s
        cost = wake + (sw.sleep_s if sw else 0.0)
        total = (sw.drain_s + sw.sleep_s if sw else 0.0) + wake
        m.switched_in = cost
        key = (sw.from_ if sw else None, m.name)
        old = self.costs.get(key)
        self.costs[key] = cost if old is None else COST_ALPHA * cost + (1 - COST_ALPHA) * old
        self.result.switches += 1
        self.result.longest_switch_s = max(self.result.longest_switch_s, total)
        while m.gate:
            self._admit(m, m.gate.popleft(), total)

    # -- the policy -----------------------------------------------------------

    def _views(self) -> dict[str, ModelView]:
        out = {}
        for m in self.models.values():
            ages = [self.now - r.arrival for r in m.gate]
            if m.state is S.SLEEPING:
                wake: float | None = m.costs.wake_s
            elif m.state is S.STOPPED:
                wake = m.costs.start_s
            else:
                wake = None
            out[m.name] = ModelView(
                name=m.name, state=m.state, busy=m.busy, in_flight=m.in_flight,
                queued=len(m.gate), oldest_wait=m.gate[0].arrival if m.gate else None,
                active_since=m.active_since, gpus=(0,), fraction=0.9,
                sleep_level=m.costs.level, wait_age_sum=sum(ages),
                newest_wait=m.gate[-1].arrival if m.gate else None,
                max_num_seqs=m.max_num_seqs, idle_since=m.idle_since,
                switched_in_secs=m.switched_in, wake_secs=wake, sleep_secs=m.costs.sleep_s)
        return out

    def _decide_until_stable(self) -> None:
        for _ in range(10):
            inp = PolicyInput(models=self._views(), now=self.now,
                              drain_before_switch=self.cfg.drain_before_switch,
                              min_active_secs=self.cfg.min_active_secs,
                              costs=dict(self.costs), options=self.cfg.options,
                              request_timeout_secs=self.cfg.request_timeout_secs)
            d = self.policy.decide(inp)
            self.recheck = d.recheck_at if d.recheck_at is None or d.recheck_at > self.now \
                else None
            changed = False
            for a in d.actions:
                m = self.models[a.model]
                if m.busy:
                    continue
                if isinstance(a, Deactivate) and m.state is S.ACTIVE:
                    self._deactivate(m, a)
                    changed = True
                elif isinstance(a, Activate) and m.state in (S.SLEEPING, S.STOPPED):
                    self._activate(m)
                    changed = True
            if not changed:
                return
            self._step_ops_and_completions()

    def _deactivate(self, m: _Model, a: Deactivate) -> None:
        target = self.models.get(a.for_model or "")
        sw = _Switch(self.now, m.name)
        if target is not None and target.switch is None:
            target.switch = sw
        m.pending_from = target.switch if target is not None else sw
        m.state = S.DRAINING
        m.drain_started = self.now
        cap = self.cfg.drain_timeout_secs if a.drain_secs is None \
            else min(a.drain_secs, self.cfg.drain_timeout_secs)
        m.drain_deadline = self.now + (cap if a.drain else 0.0)

    def _activate(self, m: _Model) -> None:
        holders = [o for o in self.models.values()
                   if o is not m and o.state in (S.ACTIVE, S.DRAINING, S.WAKING, S.STARTING)]
        if holders:
            raise RuntimeError(f"policy activated {m.name} while {holders[0].name} holds the GPU")
        if m.state is S.SLEEPING:
            m.state, m.op_kind, m.op_end = S.WAKING, "wake", self.now + m.costs.wake_s
        else:
            m.state, m.op_kind, m.op_end = S.STARTING, "start", self.now + m.costs.start_s


# The Rust simulator had neither request nor drain timeouts.
RUST_CONFIG = SimConfig(drain_timeout_secs=math.inf, request_timeout_secs=math.inf)


def simulate(workload: Workload, costs: Costs, config: SimConfig) -> Result:
    return Simulation(workload, costs, config).run()


# --------------------------------------------------------------------------
# The table

def table(workloads: Sequence[Workload], cost_names: Sequence[str],
          policies: Sequence[str] = POLICY_TYPES, config: SimConfig | None = None
          ) -> list[Result]:
    base = config or SimConfig()
    out = []
    for w in workloads:
        for cn in cost_names:
            for p in policies:
                cfg = SimConfig(p, base.options, base.drain_before_switch,
                                base.min_active_secs, base.drain_timeout_secs,
                                base.request_timeout_secs)
                out.append(simulate(w, COSTS[cn], cfg))
    return out


def render(results: Sequence[Result], per_model: bool = True) -> str:
    head = ("| workload | switch | policy | done | failed | req/s | switches/h | serving % "
            "| max wait s |" + (" p50 / p99 latency s per model |" if per_model else ""))
    sep = "|" + "---|" * (9 + (1 if per_model else 0))
    lines = [head, sep]
    for r in results:
        row = (f"| {r.workload} | {r.costs} | {r.policy} | {r.completed} | {r.failed} "
               f"| {r.throughput:.3f} | {r.switches_per_hour:.0f} | {r.serving_pct:.1f} "
               f"| {r.max_wait:.1f} |")
        if per_model:
            row += " " + ", ".join(f"{n} {m.pct(0.5):.1f}/{m.pct(0.99):.1f}"
                                   for n, m in r.per_model.items()) + " |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmuxd.policy.simulate",
                                 description="Replay workloads through the policies "
                                             "in virtual time and print the table.")
    ap.add_argument("--family", choices=("poisson", "rust", "all"), default="all")
    ap.add_argument("--hours", type=float, default=1.0, help="Poisson runs (simulated)")
    ap.add_argument("--costs", default=None,
                    help=f"comma-separated presets ({', '.join(COSTS)})")
    ap.add_argument("--policies", default=",".join(POLICY_TYPES))
    ap.add_argument("--no-per-model", action="store_true")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICY_TYPES:
            ap.error(f"unknown policy {p!r} (one of {', '.join(POLICY_TYPES)})")
    for c in (args.costs.split(",") if args.costs else []):
        if c not in COSTS:
            ap.error(f"unknown cost preset {c!r} (one of {', '.join(COSTS)})")
    if not args.hours > 0:
        ap.error("--hours must be > 0")
    parts = []
    if args.family in ("poisson", "all"):
        costs = args.costs.split(",") if args.costs else ["14B-L1", "14B-L2", "2s", "5s"]
        parts.append((f"Poisson open-loop, {args.hours:g} simulated hour(s)",
                      table(poisson_workloads(args.hours * 3600), costs, policies)))
    if args.family in ("rust", "all"):
        costs = args.costs.split(",") if args.costs else ["2s", "5s", "10s", "20s"]
        parts.append(("Rust llmux 0.9 profiles (no timeouts, as there)",
                      table(rust_profiles(), costs, policies, RUST_CONFIG)))
    for title, res in parts:
        print(f"### {title}\n")
        print(render(res, per_model=not args.no_per_model))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
