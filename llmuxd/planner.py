"""The scheduler's planner: views for the policy, its Decisions turned into operations.

The policy (policy/) is pure: a ``PolicyInput`` in, ``Decisions`` out. The planner
is the impure half around it, run on the loop thread each pass: it reads the
model table and the lease table into ``ModelView``s (``views``), builds the
``PolicyInput`` in one function (``policy_input``, where new fields go), and
applies the decisions through the switching layer (``deactivate``/``activate``),
tying the models that leave to the switch record of the one that comes.

It also owns what happens when a preflight finds less free memory than
placement foresaw (``make_room``), which the switching layer calls back.
"""

from __future__ import annotations

import dataclasses

import structlog

from llmuxd.config import PolicyConfig
from llmuxd.core import Core
from llmuxd.host_memory import lru_key
from llmuxd.model import ModelRuntime
from llmuxd.policy import make_policy
from llmuxd.policy.base import Activate, Deactivate, ModelView, Policy, PolicyInput
from llmuxd.policy.explain import Explained, explain
from llmuxd.policy.options import PolicyOptions
from llmuxd.policy.switching import switch_cost
from llmuxd.states import ModelState
from llmuxd.switching import Switcher

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState


class Planner:
    """Asks the policy what to do and makes it happen (loop thread only)."""

    def __init__(self, core: Core, ops: Switcher) -> None:
        self.core = core
        self.ops = ops
        self.policy: Policy = make_policy(core.config.policy.policy_type)
        self.recheck_at: float | None = None
        # The last pass's explanation per model (quantum left, why waiting) for status.
        self.explained: dict[str, Explained] = {}

    def set_policy(self, policy_type: str) -> None:
        """A reload named another policy."""
        self.policy = make_policy(policy_type)

    def views(self, now: float) -> dict[str, ModelView]:
        """What the policy sees of each live model: state, traffic, placement."""
        gates = self.core.leases.view()
        views: dict[str, ModelView] = {}
        for name, m in self.core.models.items():
            if m.removed:
                continue
            gate = gates.get(name)
            queued = (gate.queued if gate else 0) + len(m.demands)
            waits = [t for t in (gate.oldest_wait if gate else None, m.demand_since)
                     if t is not None]
            newest = [t for t in (gate.newest_wait if gate else None,
                                  m.demand_since if m.demands else None) if t is not None]
            age = 0.0
            if gate is not None and gate.queued:
                age += gate.queued * now - gate.wait_sum
            if m.demands and m.demand_since is not None:
                age += len(m.demands) * (now - m.demand_since)
            in_flight = gate.in_flight if gate else 0
            idle_since = None
            if m.state is S.ACTIVE and not in_flight and not queued:
                idle_since = max(gate.last_use if gate else 0.0, m.active_since or 0.0)
            views[name] = ModelView(
                name=name, state=m.state, busy=m.busy,
                in_flight=in_flight, queued=queued,
                oldest_wait=min(waits) if waits else None, active_since=m.active_since,
                gpus=m.config.gpu_indices, fraction=m.config.gpu_memory_utilization,
                sleep_level=m.config.sleep_level, ready_at=m.backoff_until,
                pinned=m.pinned, wait_age_sum=max(0.0, age),
                newest_wait=max(newest) if newest else None,
                max_num_seqs=m.config.max_num_seqs, idle_since=idle_since,
                switched_in_secs=m.switched_in_secs if m.state is S.ACTIVE else 0.0,
                wake_secs=m.expected_in_secs(), sleep_secs=m.expected_out_secs(),
                always_active=m.config.keep_active)
        return views

    def policy_input(self, views: dict[str, ModelView], now: float) -> PolicyInput:
        """The one place a ``PolicyInput`` is built (add new fields here)."""
        policy = self.core.config.policy
        return PolicyInput(models=views, now=now,
                           drain_before_switch=policy.drain_before_switch,
                           min_active_secs=policy.min_active_secs,
                           costs=dict(self.core.costs), options=policy_options(policy),
                           request_timeout_secs=policy.request_timeout_secs)

    def schedule(self, now: float) -> None:
        """Each loop pass: drop abandoned switches, then apply the policy's decisions."""
        models = self.core.models
        views = self.views(now)
        for name, v in views.items():
            rt = models[name]
            if (rt.switch is not None and rt.switch.to == name and not v.queued
                    and not rt.busy and v.state in (S.STOPPED, S.SLEEPING, S.BACKOFF)):
                self.ops.finish_switch(rt, "abandoned")    # its waiters gave up
        if not any(v.queued for v in views.values()):
            self.explained = {}
            self.recheck_at = None
            return
        for name, v in views.items():       # hear at once when a busy model goes idle
            if v.state is S.ACTIVE and v.in_flight:
                self.core.leases.watch_idle(name)
        inp = self.policy_input(views, now)
        decisions = self.policy.decide(inp)
        self.recheck_at = decisions.recheck_at
        try:
            self.explained = explain(inp, self.policy, decisions)
        except Exception:       # status must never stop the scheduler
            log.exception("explain_failed")
            self.explained = {}
        for d in decisions.actions:
            m = models.get(d.model)
            if m is None or m.busy:
                continue
            if isinstance(d, Deactivate):
                if m.state is S.ACTIVE:
                    target = models.get(d.for_model or "")
                    if target is not None and target.switch is None:
                        target.switch = self.ops.new_switch(target.name)
                    if target is not None and target.switch is not None \
                            and m.name not in target.switch.from_:
                        target.switch.from_.append(m.name)
                    m.switch = target.switch if target is not None else None
                    cap = self.drain_cap(inp, views[m.name], views.get(d.for_model or ""),
                                         d.drain_secs)
                    self.ops.deactivate(m, d.level, d.drain, d.reason, cap)
            elif isinstance(d, Activate):
                self.ops.activate(m, d.reason)

    def drain_cap(self, inp: PolicyInput, victim: ModelView, target: ModelView | None,
                  asked: float | None) -> float | None:
        """How long ``victim`` may drain for ``target`` (None: daemon.drain_timeout_secs).

        The waiting requests' timeout wins over the drain: a drain that outlasts the
        requests it makes room for only puts a model to sleep for nobody (their 504s
        come first). So it ends when the target's oldest lease waiter still has time
        for the switch itself: its request_timeout_secs minus the expected switch
        cost, and never later than half of that timeout (the other half is for the
        switch while its cost is unknown or small). A switch that cannot finish in
        time whatever the drain does (its cost alone exceeds the timeout) keeps the
        configured drain: cutting requests in flight would serve nobody.
        """
        cap = asked
        gate = self.core.leases.view().get(target.name) if target is not None else None
        if target is not None and gate is not None and gate.oldest_wait is not None:
            timeout = self.core.config.policy.request_timeout_secs
            cost = switch_cost(inp, victim, target) if (
                (victim.name, target.name) in inp.costs or target.wake_secs is not None) else 0.0
            if cost < timeout:
                budget = gate.oldest_wait + timeout - max(cost, timeout / 2) - inp.now
                budget = max(0.0, budget)
                if cap is None or budget < cap:
                    cap = budget
                if budget < self.core.config.daemon.drain_timeout_secs:
                    log.info("drain_capped", model=victim.name, for_model=target.name,
                             drain_s=round(budget, 3), switch_cost_s=round(cost, 3),
                             reason="the waiting requests would time out first")
        return cap

    def make_room(self, m: ModelRuntime, why: str) -> bool:
        """Free memory on m's GPUs beyond what placement foresaw; True if waiting is useful.

        First wait for anything already moving, then put active models to sleep; only
        when nothing else is left, stop sleepers (their residue is what is in the way).
        """
        gpus = set(m.config.gpu_indices)
        others = [o for o in self.core.models.values()
                  if o is not m and gpus & set(o.config.gpu_indices)]
        if any(o.busy or o.state in (S.DRAINING, S.STOPPING, S.STARTING, S.WAKING)
               for o in others):
            return True
        actives = [o for o in others
                   if o.state is S.ACTIVE and not o.pinned and not o.config.keep_active]
        for other in actives:
            log.info("making_room", model=m.name, evict=other.name, why=why)
            other.switch = m.switch
            if m.switch is not None:
                m.switch.from_.append(other.name)
            self.ops.deactivate(other, other.config.sleep_level,
                                self.core.config.policy.drain_before_switch,
                                f"making room for {m.name}: {why}")
        if actives:
            return True
        # Sleepers' residue (CUDA context) is in the way: the least recently used one
        # goes first (those requests wait for, last), one at a time; the preflight runs
        # again when it is gone.
        gates = self.core.leases.view()
        sleepers = sorted((o for o in others if o.state is S.SLEEPING),
                          key=lambda o: (bool(o.demands or (o.name in gates
                                                            and gates[o.name].queued)),
                                         lru_key(o.last_used, o.state_since_mono)))
        if sleepers:
            other = sleepers[0]
            log.info("making_room", model=m.name, stop=other.name, why=why,
                     reason="least recently used sleeper")
            self.ops.stop_model(other, f"stopping the least recently used sleeper to make "
                                       f"room for {m.name}: {why}")
        return bool(sleepers)


def policy_options(policy: PolicyConfig) -> PolicyOptions:
    """The ``[policy]`` tuning knobs as the policies' options record (same names)."""
    names = {f.name for f in dataclasses.fields(PolicyOptions)}
    return PolicyOptions(**{n: getattr(policy, n) for n in names if hasattr(policy, n)})
