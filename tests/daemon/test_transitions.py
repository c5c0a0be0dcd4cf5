"""Model state edges through ModelRuntime.enter (checked and logged)."""

from __future__ import annotations

import pytest

from llmuxd.config import ModelConfig
from llmuxd.model import ModelRuntime
from llmuxd.states import IllegalTransition
from llmuxd.states import ModelState as S


def model_in(state: S) -> ModelRuntime:
    m = ModelRuntime(ModelConfig(name="m", model_path="x", port=8001))
    m.state = state
    return m


@pytest.mark.parametrize(("old", "new"), [
    (S.STOPPED, S.STARTING), (S.STARTING, S.ACTIVE), (S.ACTIVE, S.DRAINING),
    (S.DRAINING, S.SLEEPING), (S.SLEEPING, S.WAKING), (S.WAKING, S.ACTIVE),
    (S.DRAINING, S.STOPPING), (S.STOPPING, S.STOPPED), (S.STARTING, S.BACKOFF),
    (S.BACKOFF, S.STARTING), (S.STARTING, S.FAILED), (S.FAILED, S.STOPPED),
    (S.WAKING, S.STOPPING), (S.ACTIVE, S.STOPPED), (S.DRAINING, S.ACTIVE),
    (S.STOPPED, S.BACKOFF),
])
def test_transition_allowed(old: S, new: S) -> None:
    m = model_in(old)
    m.enter(new, "test")
    assert m.state is new


def test_transition_draining_to_sleeping_records_no_active_since():
    m = model_in(S.ACTIVE)
    m.active_since = 1.0
    m.enter(S.DRAINING, "switch")
    assert m.active_since == 1.0
    m.enter(S.SLEEPING, "asleep")
    assert m.active_since is None


def test_transition_starting_to_active_sets_active_since():
    m = model_in(S.STARTING)
    m.enter(S.ACTIVE, "healthy")
    assert m.active_since is not None


@pytest.mark.parametrize(("old", "new"), [
    (S.STOPPED, S.ACTIVE), (S.SLEEPING, S.ACTIVE), (S.FAILED, S.ACTIVE),
    (S.STOPPING, S.ACTIVE), (S.BACKOFF, S.ACTIVE), (S.SLEEPING, S.DRAINING),
])
def test_transition_illegal_edge_raises(old: S, new: S) -> None:
    m = model_in(old)
    with pytest.raises(IllegalTransition):
        m.enter(new, "bug")
    assert m.state is old
