"""``llmuxctl validate`` on a supervised model: a job that walks it through four stages.

The run itself (sleep/wake at each level, memory checks, the deterministic probe)
is ``validate.run_validate_on``, the same code as ``llmuxd --validate``. What the
daemon adds is getting the model alone on its GPUs first, because a validate
measures memory and must not race real traffic:

* activate: the model is demanded like a ``start`` (the policy makes room);
* exclusive: pinned (never evicted), every other model on its GPUs is put to sleep;
* drain: its gate is closed (leases wait) and in-flight leases finish, bounded by
  ``drain_timeout_secs``;
* running: one ``validate`` operation in a worker; at the end the model is ACTIVE
  again (gate open, waiters granted) or, if the run left it unusable, stopped.

A job always ends, answered and unpinned: a kill, a crash or a reload that stops
the model before or while it runs cuts it short (``model_failed``), and its
deadline (``model_commands.validate_timeout``) ends it with ``timeout`` wherever it
is stuck: waiting for other models to leave, for a drain, or in the run itself
(then the model is stopped).

Every method runs on the supervisor's loop thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import structlog

from llmuxd.core import Core
from llmuxd.errors import ApiError, shutting_down
from llmuxd.model import ModelRuntime, Operation, ValidateJob
from llmuxd.model_commands import validate_timeout
from llmuxd.states import ModelState
from llmuxd.switching import Switcher

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState


class ValidateJobs:
    """The validate jobs of the supervisor's models (``ModelRuntime.validate_job``)."""

    def __init__(self, core: Core, ops: Switcher) -> None:
        self.core = core
        self.ops = ops

    def request(self, name: str, levels: list[int], fut: Future[Any],
                verbose: bool = False) -> None:
        """Start a validate run on ``name``; ``fut`` gets the report (or the error)."""
        core = self.core
        if core.shutdown is not None:
            raise shutting_down()
        m = core.model_named(name)
        if m.validate_job is not None:
            raise ApiError("conflict", f"a validate run on '{name}' is already going on",
                           model=name)
        if m.state is S.FAILED:
            m.failures = 0
            m.enter(S.STOPPED, "validate requested: clearing the failure hold")
            core.leases.set_hold(m.name, None)
        demand: Future[Any] = Future()
        m.validate_job = ValidateJob(
            levels=levels, reply=fut, demand=demand, verbose=verbose,
            deadline=time.monotonic() + validate_timeout(core.config, name, len(levels)))
        if m.state is S.ACTIVE:
            demand.set_result(m)
        else:
            m.demands.append(demand)
            if m.demand_since is None:
                m.demand_since = time.monotonic()
        core.kick()

    def progress(self, now: float) -> None:
        """Move every job on by a stage when its model is idle (each loop pass)."""
        core, ops = self.core, self.ops
        for m in list(core.models.values()):
            job = m.validate_job
            if job is None:
                continue
            if now >= job.deadline and job.error is None:
                self._expire(m, job)
                continue
            if m.busy:
                continue
            if (job.stage == "exclusive" and m.state is not S.ACTIVE) or (
                    job.stage == "drain" and m.state is not S.DRAINING):
                self._end(m, error=_cut_short(m.name))    # killed, crashed or reloaded
                continue
            if job.stage == "activate":
                if job.demand.done() and job.demand.exception() is not None:
                    self._end(m, error=job.demand.exception())
                elif m.state is S.ACTIVE:
                    m.pinned = True
                    job.stage = "exclusive"
            if job.stage == "exclusive":
                gpus = set(m.config.gpu_indices)
                others = [o for o in core.models.values() if o is not m
                          and gpus & set(o.config.gpu_indices)
                          and (o.busy or o.state in (S.ACTIVE, S.DRAINING, S.STARTING,
                                                     S.WAKING, S.STOPPING))]
                for o in others:
                    if o.state is S.ACTIVE and not o.busy:
                        ops.deactivate(o, o.config.sleep_level,
                                       core.config.policy.drain_before_switch,
                                       f"validate of {m.name} needs the GPUs to itself")
                if not others and m.state is S.ACTIVE:
                    in_flight = core.leases.close_gate(m.name)
                    m.drain_deadline = None
                    m.enter(S.DRAINING, f"validate: holding back leases ({in_flight} "
                            "in flight)")
                    job.drain_deadline = now + core.config.daemon.drain_timeout_secs
                    job.stage = "drain"
            if job.stage == "drain":
                gate = core.leases.view().get(m.name)
                if gate is not None and gate.in_flight and now < job.drain_deadline:
                    continue
                job.stage = "running"
                self._run(m, job)

    def _run(self, m: ModelRuntime, job: ValidateJob) -> None:
        cfg = self.core.config
        client, child, probe = m.client, m.child, self.core.probe
        gpus = list(m.config.gpu_indices)
        name = m.name

        def work(_op: Operation) -> Any:
            from llmuxd.validate import run_validate_on
            return run_validate_on(
                client, child.group_pids, probe, job.levels, cfg.daemon.sleep_residue_mib,
                job.steps.append if job.verbose else None, gpu_indices=gpus,
                sleep_timeout=cfg.daemon.sleep_timeout_secs,
                wake_timeout=cfg.daemon.wake_timeout_secs,
                request_timeout=cfg.policy.request_timeout_secs, model_name=name)

        def done(mm: ModelRuntime, _op: Operation, report: Any,
                 error: BaseException | None) -> None:
            self._end(mm, report=report, error=error)

        def cleanup() -> None:
            # Detached (a kill, a stop or the deadline took the model): no report
            # came, the job still pins the model and its caller still waits.
            if m.validate_job is job:
                self._end(m, error=job.error or _cut_short(name))

        op = self.ops.runner.launch(m, "validate", work, done)
        op.on_cleanup(cleanup)

    def _expire(self, m: ModelRuntime, job: ValidateJob) -> None:
        """The job's deadline passed: end it with ``timeout``, wherever it is stuck."""
        secs = validate_timeout(self.core.config, m.name, len(job.levels))
        job.error = ApiError(
            "timeout", f"validate of '{m.name}' did not finish within {secs:g}s "
            f"(stuck at stage '{job.stage}'; daemon.validate_timeout_secs)", model=m.name)
        log.warning("validate_timeout", model=m.name, stage=job.stage, after_s=secs)
        if job.stage == "running":          # the cleanup answers once the stop detached it
            self.ops.stop_model(m, f"validate did not finish within {secs:g}s")
            return
        if job.demand in m.demands:
            m.demands.remove(job.demand)
            if not m.demands:
                m.demand_since = None
        self._end(m, error=job.error)

    def _end(self, m: ModelRuntime, report: Any = None,
             error: BaseException | None = None) -> None:
        """Unpin m, leave it ACTIVE (or stop it if validate left it unusable), answer."""
        job, m.validate_job = m.validate_job, None
        m.pinned = False
        if job is None:
            return
        # Only the job's own drain (no deadline: leases held back) is undone here;
        # a DRAINING of another cause (a reload, a switch) goes on.
        if job.stage in ("drain", "running") and m.state is S.DRAINING \
                and m.drain_deadline is None:
            awake = job.stage == "drain" or (report is not None and report.left_awake)
            if awake:
                m.enter(S.ACTIVE, "validate done")
                self.ops.became_active(m)
            else:
                self.ops.stop_model(m, "validate left the model unusable: stopping (L3)")
            # A reload that changed m meanwhile: act now (when a validate operation
            # ended, the runner's on_end does it again, which is harmless).
            self.ops.apply_pending(m)
        if job.reply.done():
            return
        if error is not None:
            if isinstance(error, ApiError):
                job.reply.set_exception(error)
            else:
                log.error("validate_failed", model=m.name, error=repr(error))
                job.reply.set_exception(ApiError("internal", f"validate failed: {error}",
                                                 model=m.name))
        else:
            answer = report.to_dict()
            if job.verbose:
                answer["steps"] = list(job.steps)
            job.reply.set_result(answer)


def _cut_short(name: str) -> ApiError:
    return ApiError("model_failed", f"validate of '{name}' was cut short: the model was "
                    "stopped while it ran", model=name)
