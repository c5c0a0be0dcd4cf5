"""Model lifecycle states and the only transitions allowed between them.

Stdlib only, like Supervisor's ``states.py``: the enum, the groups, and a table
that the supervisor checks on every change, so an impossible edge is a loud bug
instead of a silently corrupted model.
"""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    """Where one model's vLLM child is in its life."""

    STOPPED = "stopped"      # no process (never started, L3-slept, or stopped)
    STARTING = "starting"    # process spawned, waiting for /health (+ warm-up)
    ACTIVE = "active"        # awake, serving leases
    DRAINING = "draining"    # awake, no new leases, waiting for in-flight to end
    SLEEPING = "sleeping"    # process alive, asleep at level 1 or 2
    WAKING = "waking"        # wake sequence (and warm-up) running
    STOPPING = "stopping"    # SIGTERM sent to the group, waiting for reap
    BACKOFF = "backoff"      # last start failed; next try after a delay
    FAILED = "failed"        # too many failed starts; held until start/reload


S = ModelState

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.BACKOFF, S.FAILED}),
    S.STARTING: frozenset({S.ACTIVE, S.STOPPING, S.BACKOFF, S.FAILED, S.STOPPED}),
    S.ACTIVE: frozenset({S.DRAINING, S.STOPPING, S.STOPPED, S.SLEEPING}),
    S.DRAINING: frozenset({S.ACTIVE, S.SLEEPING, S.STOPPING, S.STOPPED}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.STOPPED}),
    S.WAKING: frozenset({S.ACTIVE, S.STOPPING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.FAILED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}

# A process exists (or may) in these states: it must be stopped on shutdown.
HAS_PROCESS = frozenset({S.STARTING, S.ACTIVE, S.DRAINING, S.SLEEPING, S.WAKING, S.STOPPING})
# These states hold GPU memory beyond the CUDA context residue.
HOLDS_GPU = frozenset({S.STARTING, S.ACTIVE, S.DRAINING, S.WAKING})
# Leases may be granted only here.
SERVING = frozenset({S.ACTIVE})
# An operation is running on the model; other operations must wait for it.
BUSY = frozenset({S.STARTING, S.DRAINING, S.WAKING, S.STOPPING})


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the supervisor."""


def check_transition(old: ModelState, new: ModelState) -> None:
    """Raise IllegalTransition unless old → new is in the table."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal transition")
