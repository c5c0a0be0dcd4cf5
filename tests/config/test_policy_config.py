"""The [policy] block: policy_type and the policies' options, checked with one-line errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from llmuxd.config import POLICY_OPTIONS, POLICY_TYPES, ConfigError, PolicyConfig, build_config
from llmuxd.planner import policy_options
from llmuxd.policy import POLICY_TYPES as IMPLEMENTED
from llmuxd.policy.options import PolicyOptions


def config(**policy: Any) -> PolicyConfig:
    return build_config({"models": {"a": {"model_path": "m", "port": 8001}},
                         "policy": policy}).policy


def errors(**policy: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config(**policy)
    return exc.value.errors


def test_every_implemented_policy_is_accepted_and_fifo_stays_the_default():
    assert set(POLICY_TYPES) == set(IMPLEMENTED)
    assert config().policy_type == "fifo"
    for name in IMPLEMENTED:
        assert config(policy_type=name).policy_type == name


def test_an_unknown_policy_is_one_line_naming_the_choices():
    assert errors(policy_type="lru") == [
        "policy.policy_type: must be one of fifo, cost_aware, time_slice, adaptive"]


def test_the_options_are_the_policies_options_with_the_same_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(PolicyOptions)}
    assert set(POLICY_OPTIONS) == set(fields)
    defaults = PolicyConfig()
    assert {n: getattr(defaults, n) for n in POLICY_OPTIONS} == fields
    assert policy_options(defaults) == PolicyOptions()


def test_options_reach_the_policy_as_configured():
    p = config(policy_type="cost_aware", max_wait_secs=30, amortization_factor=1.5,
               coalesce_window_ms=500, tick_interval_ms=250, min_quantum_ms=100,
               default_switch_secs=4, linger_factor=0)
    assert policy_options(p) == PolicyOptions(
        max_wait_secs=30.0, amortization_factor=1.5, coalesce_window_ms=500.0,
        tick_interval_ms=250.0, min_quantum_ms=100.0, default_switch_secs=4.0,
        linger_factor=0.0)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_wait_secs", -1, "policy.max_wait_secs: must be a number >= 0"),
    ("amortization_factor", "x", 'policy.amortization_factor: must be a number (got "x")'),
    ("tick_interval_ms", 0, "policy.tick_interval_ms: must be greater than 0"),
    ("coalesce_window_ms", True, "policy.coalesce_window_ms: must be a number (got true)"),
    ("quantum", 3, "policy.quantum: unknown key"),
])
def test_bad_options_are_refused_with_one_line_each(key, value, message):
    assert errors(**{key: value}) == [message]


def test_the_drain_timeout_default_is_below_the_request_timeout():
    """Issue 10: both were 60 s, so a drain gave up exactly when its waiters did."""
    c = build_config({"models": {"a": {"model_path": "m", "port": 8001}}})
    assert c.daemon.drain_timeout_secs < c.policy.request_timeout_secs


def test_self_defeating_timeouts_are_warned_about_not_refused():
    from llmuxd.config import policy_warnings
    base = {"models": {"a": {"model_path": "m", "port": 8001}}}
    assert policy_warnings(build_config(base)) == []
    c = build_config({**base, "daemon": {"drain_timeout_secs": 60},
                      "policy": {"policy_type": "adaptive", "max_wait_secs": 90}})
    warnings = policy_warnings(c)
    assert len(warnings) == 2
    assert warnings[0].startswith("daemon.drain_timeout_secs (60) is not below "
                                  "policy.request_timeout_secs (60)")
    assert warnings[1].startswith("policy.max_wait_secs (90) is not below")
