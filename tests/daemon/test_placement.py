"""Placement: which fractions fit together on which GPUs (pure)."""

from llmuxd.placement import Placed, compatible, fits, victims


def test_two_models_at_0_4_fit_together_on_one_gpu():
    assert compatible(Placed("a", (0,), 0.4), Placed("b", (0,), 0.4))


def test_two_models_at_0_9_do_not_fit_together():
    assert not compatible(Placed("a", (0,), 0.9), Placed("b", (0,), 0.9))


def test_models_on_different_gpus_never_conflict():
    assert compatible(Placed("a", (0,), 0.9), Placed("b", (1,), 0.9))


def test_tensor_parallel_model_conflicts_on_any_shared_gpu():
    assert not fits(Placed("tp", (0, 1), 0.6), [Placed("x", (1,), 0.5)])


def test_victims_stop_as_soon_as_the_target_fits():
    holders = [Placed("a", (0,), 0.4), Placed("b", (0,), 0.4)]
    assert victims(Placed("c", (0,), 0.4), holders) == ["a"]


def test_victims_follow_the_given_order():
    holders = [Placed("b", (0,), 0.4), Placed("a", (0,), 0.4)]
    assert victims(Placed("c", (0,), 0.4), holders) == ["b"]


def test_victims_ignore_models_on_other_gpus():
    holders = [Placed("other", (1,), 0.9), Placed("a", (0,), 0.9)]
    assert victims(Placed("c", (0,), 0.9), holders) == ["a"]


def test_no_victims_when_the_target_already_fits():
    assert victims(Placed("c", (0,), 0.5), [Placed("a", (0,), 0.5)]) == []
