"""Which models may hold their GPUs at the same time (pure; no processes, no I/O).

Placement reasons in fractions, the unit the operator configured
(``gpu_memory_utilization`` per GPU): two models fit together when, on every GPU
they share, their fractions add up to at most 1. The seed's one-model-at-a-time
behaviour falls out when every model asks for 0.9. What the fractions cannot see
(sleeping children's CUDA-context residue, foreign processes) is caught later by
the GPU probe's free-memory check before a start or wake.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EPSILON = 1e-9


@dataclass(frozen=True)
class Placed:
    """A model as placement sees it: its GPUs and the fraction of each it takes."""

    name: str
    gpus: tuple[int, ...]
    fraction: float


def load_by_gpu(models: Iterable[Placed]) -> dict[int, float]:
    """Sum of fractions per GPU."""
    load: dict[int, float] = {}
    for m in models:
        for g in m.gpus:
            load[g] = load.get(g, 0.0) + m.fraction
    return load


def fits(target: Placed, holders: Iterable[Placed]) -> bool:
    """True when ``target`` fits on its GPUs next to ``holders``."""
    load = load_by_gpu(h for h in holders if h.name != target.name)
    return all(load.get(g, 0.0) + target.fraction <= 1.0 + EPSILON for g in target.gpus)


def victims(target: Placed, holders: Sequence[Placed]) -> list[str]:
    """The holders that must leave for ``target`` to fit, taken in the given order.

    ``holders`` is ordered by who should leave first (the policy's choice); only
    holders that share a GPU with the target are considered, and the greedy pass
    stops as soon as the target fits, so a 0.4 + 0.4 + 0.4 box evicts one model
    for a fourth 0.4, not all of them.
    """
    sharing = [h for h in holders if h.name != target.name and set(h.gpus) & set(target.gpus)]
    others = [h for h in holders if h.name != target.name and h not in sharing]
    staying = list(sharing)
    chosen: list[str] = []
    for h in sharing:
        if fits(target, staying + others):
            break
        staying.remove(h)
        chosen.append(h.name)
    if not fits(target, staying + others):
        # The target alone is over 1.0 on some GPU: nothing can make it fit;
        # every sharer leaves and the probe's check decides.
        return [h.name for h in sharing]
    return chosen


def compatible(a: Placed, b: Placed) -> bool:
    """True when a and b may be active together."""
    return fits(a, [b])
