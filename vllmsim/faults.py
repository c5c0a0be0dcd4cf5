"""Fault injection for the simulator: vLLM's known failure modes, on demand.

Faults come from `--sim-fault NAME[=ARG]` (repeatable), env `LLMUX_SIM_FAULTS`
(comma list) and, when enabled, `POST /_sim/faults` at run time. Fault arguments
are wall-clock values: they are not multiplied by the time scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultSpec:
    """One fault: its name, what its argument is, and what it does."""

    name: str
    arg: str  # "" (flag), "secs" (float) or "n" (int)
    doc: str


FAULTS: dict[str, FaultSpec] = {
    f.name: f
    for f in (
        FaultSpec("crash_at_start", "", "exit 1 during start-up, before /health is ever 200"),
        FaultSpec("never_healthy", "", "load forever: the port never answers"),
        FaultSpec("slow_start", "secs", "add SECS seconds to start-up"),
        FaultSpec("sleep_500", "", "/sleep answers 500; the engine stays awake"),
        FaultSpec("sleep_hang", "", "/sleep never answers; the engine stays awake"),
        FaultSpec("sleep_no_free", "", "/sleep answers 200 but frees no GPU memory (vllm#32714)"),
        FaultSpec("wake_500", "", "/wake_up answers 500; the engine stays asleep"),
        FaultSpec("reload_fail", "", "collective_rpc reload_weights answers 500"),
        FaultSpec("die_mid_stream", "n", "the server dies after sending N chunks of a stream"),
        FaultSpec("ignore_sigterm", "", "SIGTERM is ignored: only SIGKILL stops the server"),
        FaultSpec("exit_after", "n", "the server exits (code 1) after answering N requests"),
    )
}


class FaultError(ValueError):
    """A fault name or argument that does not parse."""


def parse_fault(text: str) -> tuple[str, float | int | bool]:
    """Parse "NAME" or "NAME=ARG" into (name, value)."""
    name, sep, raw = text.strip().partition("=")
    name = name.strip()
    spec = FAULTS.get(name)
    if spec is None:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    return name, _coerce(spec, raw.strip() if sep else None)


def _coerce(spec: FaultSpec, raw: object) -> float | int | bool:
    if spec.arg == "":
        if raw in (None, "", True, "1", "true", 1):
            return True
        raise FaultError(f"fault {spec.name} takes no argument")
    if raw is None or raw == "" or isinstance(raw, bool):
        raise FaultError(f"fault {spec.name} needs an argument ({spec.name}={spec.arg.upper()})")
    try:
        value = float(str(raw)) if spec.arg == "secs" else int(str(raw))
    except ValueError:
        raise FaultError(f"fault {spec.name}: bad argument {raw!r}") from None
    if value < 0:
        raise FaultError(f"fault {spec.name}: argument must be >= 0")
    return value


class Faults:
    """The faults active in one server, changeable at run time."""

    def __init__(self, specs: Iterable[str] = ()) -> None:
        self.active: dict[str, float | int | bool] = {}
        for text in specs:
            if text.strip():
                name, value = parse_fault(text)
                self.active[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.active

    def value(self, name: str) -> float | int | bool | None:
        return self.active.get(name)

    def update(self, set_: Mapping[str, object], clear: Iterable[str]) -> None:
        """Apply a runtime change; validates everything before changing anything."""
        new = dict(self.active)
        for name in clear:
            if name not in FAULTS:
                raise FaultError(f"unknown fault {name!r}")
            new.pop(name, None)
        for name, raw in set_.items():
            spec = FAULTS.get(name)
            if spec is None:
                raise FaultError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
            if raw is False or raw is None:
                new.pop(name, None)
                continue
            new[name] = _coerce(spec, raw)
        self.active = new

    def as_dict(self) -> dict[str, float | int | bool]:
        return dict(self.active)
