"""Validate a model's sleep/wake cycles: the seed's ``--validate``, with memory checks.

For each level: a deterministic request as the baseline, sleep (timed), GPU memory
before and after, wake (timed, with the level's sequence), memory after the wake,
and the same request again. The seed only compared the answers; here a level also
fails when the probe shows the memory was not really freed (vllm#32714), so a
broken vLLM build is caught before it reaches production.

Two entry points: :func:`run_validate` starts the model alone (``llmuxd
--validate``, no daemon); :func:`run_validate_on` runs against a child the daemon
already supervises (``llmuxctl validate``).
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmuxd.child import ChildProcess, SpawnError
from llmuxd.config import Config, ModelConfig
from llmuxd.gpu.base import GpuProbe
from llmuxd.gpu.memory import child_usage, fits, gpu_used, sleep_problem
from llmuxd.guardian import Guardian, GuardianError
from llmuxd.vllm_client import ChildExited, VllmClient, VllmError

VerbosePrint = Callable[[str], None]
ChildFactory = Callable[[ModelConfig], ChildProcess]

_LOG_TAIL = 20


class ValidateError(ValueError):
    """The validate request itself is unusable (unknown model, bad level)."""


@dataclass
class ValidateRow:
    """One level's result: one line of the table."""

    level: int
    sleep_s: float | None = None
    wake_s: float | None = None
    gpu_before_mib: int | None = None
    gpu_after_mib: int | None = None
    gpu_wake_mib: int | None = None
    response: str = "error"  # "match" | "MISMATCH" | "error" | "skipped"
    passed: bool = False
    reason: str = ""
    skipped: bool = False
    answer: str | None = None
    gpu_after_by_gpu: dict[int, int] | None = None


@dataclass
class ValidateReport:
    """The whole run: its rows, the baseline answer and any error that stopped it."""

    model: str
    probe: str
    levels: list[int]
    rows: list[ValidateRow] = field(default_factory=list)
    baseline: str | None = None
    error: str = ""
    left_awake: bool = False  # the model answered and was awake at the end

    @property
    def passed(self) -> bool:
        """True when nothing failed and every requested level ran (or was skipped)."""
        if self.error or len(self.rows) != len(self.levels):
            return False
        return all(row.passed or row.skipped for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            data = asdict(row)
            by_gpu = data.pop("gpu_after_by_gpu")
            data["gpu_after_by_gpu"] = (None if by_gpu is None
                                        else {str(k): v for k, v in by_gpu.items()})
            rows.append(data)
        return {"model": self.model, "probe": self.probe, "levels": list(self.levels),
                "passed": self.passed, "error": self.error or None,
                "baseline": self.baseline, "left_awake": self.left_awake, "rows": rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidateReport:
        """Rebuild a report from :meth:`to_dict` (llmuxctl prints the daemon's answer)."""
        rows = []
        for raw in data.get("rows", []):
            row = dict(raw)
            by_gpu = row.pop("gpu_after_by_gpu", None)
            known = {k: v for k, v in row.items() if k in ValidateRow.__dataclass_fields__}
            rows.append(ValidateRow(**known, gpu_after_by_gpu=None if by_gpu is None else
                                    {int(k): int(v) for k, v in by_gpu.items()}))
        return cls(model=str(data.get("model", "")), probe=str(data.get("probe", "")),
                   levels=[int(x) for x in data.get("levels", [])], rows=rows,
                   baseline=data.get("baseline"), error=data.get("error") or "",
                   left_awake=bool(data.get("left_awake", False)))


# ---------------------------------------------------------------------------
# The table (the seed's layout, column for column)

_HEADER = ("{:<8}{:>11}{:>11}{:>13}{:>13}{:>13}{:>11}{:>7}"
           .format("Level", "Sleep (s)", "Wake (s)", "GPU Before", "GPU After", "GPU Wake",
                   "Response", "Pass"))
_RULE = "-" * 88


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value} MiB"


def format_row(row: ValidateRow) -> str:
    verdict = "SKIP" if row.skipped else ("OK" if row.passed else "FAIL")
    return "{:<8}{:>11}{:>11}{:>15}{:>15}{:>15}{:>11}{:>7}".format(
        f"L{row.level}", _secs(row.sleep_s), _secs(row.wake_s), _mib(row.gpu_before_mib),
        _mib(row.gpu_after_mib), _mib(row.gpu_wake_mib), row.response, verdict)


def format_table(report: ValidateReport) -> str:
    """The seed's table, then the reason of every failed or skipped level, then the result."""
    lines = [_HEADER, _RULE]
    lines += [format_row(row) for row in report.rows]
    notes = [f"L{row.level}: {'skipped' if row.skipped else 'FAIL'}: {row.reason}"
             for row in report.rows if (row.skipped or not row.passed) and row.reason]
    if report.error:
        notes.append(f"Error: {report.error}")
    if notes:
        lines.append("")
        lines += notes
    lines.append("")
    lines.append("Result: ALL PASSED" if report.passed else "Result: SOME FAILED")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Measuring


class _Meter:
    """Reads the child's GPU memory: per pid when the probe can, else per-GPU totals."""

    def __init__(self, probe: GpuProbe, gpu_indices: Sequence[int],
                 pids_fn: Callable[[], Iterable[int]]) -> None:
        self.probe = probe
        self.gpu_indices = tuple(gpu_indices)
        self.pids_fn = pids_fn
        self.baseline: dict[int, int] = {}
        self.available = bool(probe.gpus()) or probe.usage_by_pid() is not None

    def take_baseline(self) -> None:
        """Per-GPU use by others, before the child starts (for non-attributing probes)."""
        if self.probe.usage_by_pid() is None:
            self.baseline = gpu_used(self.probe, self.gpu_indices or None)

    def read(self) -> dict[int, int] | None:
        if not self.available:
            return None
        usage = child_usage(self.probe, self.pids_fn(), self.gpu_indices)
        if usage is not None:
            return usage
        used = gpu_used(self.probe, self.gpu_indices or None)
        return {i: max(0, mib - self.baseline.get(i, 0)) for i, mib in used.items()}


def _read_freed(meter: _Meter, residue_mib: int, settle: float) -> dict[int, int] | None:
    """Read the memory after a sleep/stop, giving the probe ``settle`` s to catch up.

    NVML drops an exited process a moment late, and per-GPU totals lag the same
    way; the verdict must not depend on that race.
    """
    deadline = time.monotonic() + settle
    while True:
        usage = meter.read()
        if usage is None or not sleep_problem(usage, residue_mib):
            return usage
        if time.monotonic() >= deadline:
            return usage
        time.sleep(0.1)


def _total(usage: dict[int, int] | None) -> int | None:
    return None if usage is None else sum(usage.values())


# ---------------------------------------------------------------------------
# One sleep/wake cycle


@dataclass
class _Timeouts:
    sleep: float = 120.0
    wake: float = 600.0
    request: float = 60.0
    startup: float = 1800.0
    stop: float = 15.0
    settle: float = 3.0  # how long freed memory may take to show in the probe


def _say(verbose_print: VerbosePrint | None, level: int | None, text: str) -> None:
    if verbose_print is not None:
        verbose_print(f"L{level}: {text}" if level is not None else text)


def _compare(row: ValidateRow, client: VllmClient, baseline: str, timeout: float) -> None:
    try:
        row.answer = client.probe_completion(timeout)
    except VllmError as exc:
        row.response = "error"
        row.reason = row.reason or f"the request after the wake failed: {exc}"
        return
    row.response = "match" if row.answer == baseline else "MISMATCH"
    if row.response == "MISMATCH":
        row.reason = row.reason or (f"the answer changed: {baseline!r} before, "
                                    f"{row.answer!r} after")


def _judge_memory(row: ValidateRow, before: dict[int, int] | None,
                  after: dict[int, int] | None, woke: dict[int, int] | None,
                  residue_mib: int) -> str:
    """Why the memory readings fail the level ("" when fine or not measured)."""
    if after is None:
        return ""
    problem = sleep_problem(after, residue_mib)
    if problem:
        return problem
    if before is not None and woke is not None:
        missing = [i for i, mib in sorted(before.items())
                   if mib > residue_mib and woke.get(i, 0) <= residue_mib]
        if missing:
            gpus = ", ".join(f"GPU {i} holds {woke.get(i, 0)} MiB" for i in missing)
            return f"the wake did not bring the memory back: {gpus}"
    return ""


def _timed(step: Callable[[], object],
           errors: type[BaseException] = VllmError) -> tuple[float, BaseException | None]:
    """Run one timed step: its duration (a failure's included) and the error it raised."""
    started = time.monotonic()
    try:
        step()
    except errors as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def _cycle(client: VllmClient, meter: _Meter, level: int, baseline: str,
           residue_mib: int, timeouts: _Timeouts, verbose_print: VerbosePrint | None
           ) -> ValidateRow:
    """Sleep at ``level`` (1 or 2), wake with its sequence, ask again, judge."""
    row = ValidateRow(level=level)
    before = meter.read()
    row.gpu_before_mib = _total(before)
    _say(verbose_print, level, f"GPU before sleep: {_mib(row.gpu_before_mib)}")
    _say(verbose_print, level, f"POST /sleep?level={level}")
    row.sleep_s, error = _timed(lambda: client.sleep(level, timeouts.sleep))
    if error is not None:
        row.reason = f"sleep failed: {error}"
        _say(verbose_print, level, row.reason)
        return row
    after = _read_freed(meter, residue_mib, timeouts.settle)
    row.gpu_after_mib = _total(after)
    row.gpu_after_by_gpu = after
    _say(verbose_print, level, f"asleep after {row.sleep_s:.2f}s; GPU after sleep: "
         f"{_mib(row.gpu_after_mib)}")
    sequence = ("/wake_up?tags=weights, /collective_rpc reload_weights, "
                "/wake_up?tags=kv_cache, /reset_prefix_cache") if level == 2 else "/wake_up"
    _say(verbose_print, level, f"wake: {sequence}")
    row.wake_s, error = _timed(lambda: client.wake(level, timeouts.wake))
    if error is not None:
        row.reason = f"wake failed: {error}"
        _say(verbose_print, level, row.reason)
        return row
    woke = meter.read()
    row.gpu_wake_mib = _total(woke)
    _say(verbose_print, level, f"awake after {row.wake_s:.2f}s; GPU after wake: "
         f"{_mib(row.gpu_wake_mib)}")
    _compare(row, client, baseline, timeouts.request)
    _say(verbose_print, level, f"answer {row.answer!r}: {row.response}")
    memory = _judge_memory(row, before, after, woke, residue_mib)
    row.passed = row.response == "match" and not memory
    if memory:
        row.reason = memory if row.response == "match" else f"{row.reason}; {memory}"
    return row


def _awake_and_answering(client: VllmClient, timeout: float) -> bool:
    try:
        return client.health(timeout=min(5.0, timeout)) and not client.is_sleeping(
            timeout=min(5.0, timeout))
    except VllmError:
        return False


# ---------------------------------------------------------------------------
# Against a child the daemon supervises


def run_validate_on(client: VllmClient, pids_fn: Callable[[], Iterable[int]],
                    probe: GpuProbe, levels: Sequence[int], residue_mib: int,
                    verbose_print: VerbosePrint | None = None, *,
                    gpu_indices: Sequence[int] = (),
                    restart: Callable[[], None] | None = None,
                    sleep_timeout: float = 120.0, wake_timeout: float = 600.0,
                    request_timeout: float = 60.0, model_name: str = "",
                    settle_s: float = 3.0) -> ValidateReport:
    """Validate a running, awake, drained child (the daemon's ``validate`` route).

    Level 3 needs a stop and a cold start: with ``restart`` (a callable that stops
    the model and brings it back healthy, blocking) it is timed as a whole into the
    Wake column; without it the level is reported as skipped. After a failed wake
    ``left_awake`` is False: the caller must stop the model, never serve it.
    """
    _check_levels(levels)
    report = ValidateReport(model=model_name or client.served_model_name, probe=probe.name,
                            levels=list(levels))
    timeouts = _Timeouts(sleep=sleep_timeout, wake=wake_timeout, request=request_timeout,
                         settle=settle_s)
    meter = _Meter(probe, gpu_indices, pids_fn)
    try:
        report.baseline = client.probe_completion(request_timeout)
    except VllmError as exc:
        report.error = f"the baseline request failed: {exc}"
        return report
    _say(verbose_print, None, f"baseline answer: {report.baseline!r}")
    for level in levels:
        if level == 3:
            if restart is None:
                report.rows.append(ValidateRow(
                    level=3, response="skipped", skipped=True,
                    reason="level 3 (stop and cold start) is not run on a supervised "
                           "model; use llmuxd --validate"))
                continue
            row = ValidateRow(level=3)
            before = meter.read()
            row.gpu_before_mib = _total(before)
            # the callback's own errors, whatever they are, are reported in the row
            row.wake_s, error = _timed(restart, Exception)
            if error is not None:
                row.reason = f"restart failed: {error}"
                report.rows.append(row)
                break
            woke = meter.read()
            row.gpu_wake_mib = _total(woke)
            _compare(row, client, report.baseline, request_timeout)
            row.passed = row.response == "match"
            report.rows.append(row)
            continue
        row = _cycle(client, meter, level, report.baseline, residue_mib, timeouts,
                     verbose_print)
        report.rows.append(row)
        if not row.passed and not _awake_and_answering(client, request_timeout):
            report.error = (f"the model is not awake after L{level}; "
                            "stopping the validate run")
            break
    report.left_awake = _awake_and_answering(client, request_timeout)
    return report


def _check_levels(levels: Sequence[int]) -> None:
    if not levels:
        raise ValidateError("no levels to validate (use --levels 1,2)")
    bad = [lv for lv in levels if lv not in (1, 2, 3)]
    if bad:
        raise ValidateError(f"sleep levels are 1, 2 or 3, not {', '.join(map(str, bad))}")


# ---------------------------------------------------------------------------
# Standalone: start the model alone


def run_validate(config: Config, model_name: str, levels: Sequence[int], probe: GpuProbe,
                 verbose_print: VerbosePrint | None = None,
                 child_factory: ChildFactory | None = None, *,
                 settle_s: float = 3.0) -> ValidateReport:
    """Start ``model_name`` alone, run every level, always stop it at the end.

    ``child_factory(model)`` spawns the child (default: ChildProcess.spawn into the
    configured log dir, falling back to a temporary dir when that is not writable,
    under a guardian so a killed validate leaves nothing on the GPU).
    """
    model = config.resolve_model(model_name)
    if model is None:
        known = ", ".join(sorted(config.models))
        raise ValidateError(f"unknown model {model_name!r} (configured: {known})")
    _check_levels(levels)
    report = ValidateReport(model=model.name, probe=probe.name, levels=list(levels))
    d = config.daemon
    timeouts = _Timeouts(sleep=d.sleep_timeout_secs, wake=d.wake_timeout_secs,
                         request=config.policy.request_timeout_secs,
                         startup=config.startup_timeout(model), stop=d.stop_timeout_secs,
                         settle=settle_s)
    if _listener_in_use(model):
        where = model.socket_path if model.transport == "unix" else f"port {model.port}"
        report.error = (f"{where} of {model.name} is already in use (is llmuxd "
                        "running? then use llmuxctl validate)")
        return report
    room, why = fits(probe, model.gpu_indices, model.gpu_memory_utilization)
    if not room:
        report.error = f"{model.name} cannot start: {why} (is another model running?)"
        return report
    guardian: Guardian | None = None
    if child_factory is None:
        try:
            guardian = Guardian().start()
        except GuardianError as exc:
            report.error = str(exc)
            return report
        child_factory = _default_factory(config, guardian, verbose_print)
    client = VllmClient.for_model(model)
    holder: list[ChildProcess] = []

    def pids() -> list[int]:
        return holder[0].group_pids() if holder else []

    meter = _Meter(probe, model.gpu_indices, pids)
    try:
        meter.take_baseline()
        if not model.enable_sleep_mode:
            _say(verbose_print, None, f"{model.name}: enable_sleep_mode is off, so sleeping "
                 "frees no GPU memory (fine for CPU backends)")
        error = _start(child_factory, model, client, holder, timeouts, verbose_print)
        if error:
            report.error = error
            return report
        try:
            report.baseline = client.probe_completion(timeouts.request)
        except VllmError as exc:
            report.error = f"the baseline request failed: {exc}"
            return report
        _say(verbose_print, None, f"baseline answer: {report.baseline!r}")
        for level in levels:
            if level == 3:
                row = _cold_cycle(child_factory, model, client, holder, meter,
                                  report.baseline, d.sleep_residue_mib, timeouts,
                                  verbose_print)
            else:
                row = _cycle(client, meter, level, report.baseline, d.sleep_residue_mib,
                             timeouts, verbose_print)
            report.rows.append(row)
            if row.passed or _awake_and_answering(client, timeouts.request):
                continue
            # A failed wake must not be served, not even by the next level: start over.
            _say(verbose_print, level, "the model is not usable; restarting it")
            _stop(holder, timeouts.stop)
            error = _start(child_factory, model, client, holder, timeouts, verbose_print)
            if error:
                report.error = f"restart after L{level} failed: {error}"
                break
        report.left_awake = bool(holder) and _awake_and_answering(client, timeouts.request)
        return report
    finally:
        _stop(holder, timeouts.stop)
        if guardian is not None:
            guardian.close()


def _default_factory(config: Config, guardian: Guardian,
                     verbose_print: VerbosePrint | None) -> ChildFactory:
    log_dirs = [Path(config.daemon.log_dir)]

    def spawn(model: ModelConfig) -> ChildProcess:
        try:
            return ChildProcess.spawn(config, model, log_dirs[-1], guardian=guardian)
        except SpawnError as exc:
            if "log file" not in str(exc) or len(log_dirs) > 1:
                raise
            log_dirs.append(Path(tempfile.mkdtemp(prefix="llmux-validate-")))
            _say(verbose_print, None, f"{exc}; logging to {log_dirs[-1]} instead")
            return ChildProcess.spawn(config, model, log_dirs[-1], guardian=guardian)

    return spawn


def _start(child_factory: ChildFactory, model: ModelConfig, client: VllmClient,
           holder: list[ChildProcess], timeouts: _Timeouts,
           verbose_print: VerbosePrint | None) -> str:
    """Spawn and wait for /health; "" on success, else the reason (with the log tail)."""
    try:
        child = child_factory(model)
    except (OSError, GuardianError) as exc:
        return f"cannot start {model.name}: {exc}"
    holder[:] = [child]
    _say(verbose_print, None, f"started {model.name} (pid {child.pid}), waiting for /health")
    try:
        client.wait_healthy(time.monotonic() + timeouts.startup, child.is_alive)
    except ChildExited:
        code = child.wait(timeout=5.0)
        tail = "\n".join(child.tail(_LOG_TAIL))
        return (f"{model.name} exited during start-up (exit status {code}); "
                f"last lines of {child.log_path}:\n{tail}")
    except VllmError as exc:
        return f"{model.name} did not become healthy: {exc}"
    _say(verbose_print, None, f"{model.name} is healthy")
    return ""


def _stop(holder: list[ChildProcess], grace: float) -> None:
    if holder:
        holder[0].stop(grace)


def _cold_cycle(child_factory: ChildFactory, model: ModelConfig, client: VllmClient,
                holder: list[ChildProcess], meter: _Meter, baseline: str, residue_mib: int,
                timeouts: _Timeouts, verbose_print: VerbosePrint | None) -> ValidateRow:
    """Level 3: stop the group (timed as the sleep), cold start (timed as the wake)."""
    row = ValidateRow(level=3)
    before = meter.read()
    row.gpu_before_mib = _total(before)
    _say(verbose_print, 3, f"GPU before stop: {_mib(row.gpu_before_mib)}; stopping")
    started = time.monotonic()
    _stop(holder, timeouts.stop)
    row.sleep_s = time.monotonic() - started
    after = _read_freed(meter, residue_mib, timeouts.settle)
    row.gpu_after_mib = _total(after)
    row.gpu_after_by_gpu = after
    _say(verbose_print, 3, f"stopped after {row.sleep_s:.2f}s; GPU after: "
         f"{_mib(row.gpu_after_mib)}; cold start")
    started = time.monotonic()
    error = _start(child_factory, model, client, holder, timeouts, verbose_print)
    row.wake_s = time.monotonic() - started
    if error:
        row.reason = f"cold start failed: {error}"
        return row
    woke = meter.read()
    row.gpu_wake_mib = _total(woke)
    _compare(row, client, baseline, timeouts.request)
    _say(verbose_print, 3, f"answer {row.answer!r}: {row.response}")
    memory = _judge_memory(row, before, after, woke, residue_mib)
    row.passed = row.response == "match" and not memory
    if memory:
        row.reason = memory if row.response == "match" else f"{row.reason}; {memory}"
    return row


def _listener_in_use(model: ModelConfig) -> bool:
    """Something already answers where this model's child would listen."""
    if model.transport != "unix":
        return _port_in_use(model.port)
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(model.socket_path) == 0


def _port_in_use(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0
