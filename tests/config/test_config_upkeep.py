"""Config keys of upkeep and memory-aware sleeping: prewarm, idle_sleep_secs, keep_active,
daemon.host_memory_limit; defaults, round trip and errors with key paths."""

from __future__ import annotations

import tomllib

import pytest

from llmuxd import tomlout
from llmuxd.config import ConfigError, build_config
from llmuxd.switching import needs_restart


def cfg(models, daemon=None):
    raw = {"models": models}
    if daemon is not None:
        raw["daemon"] = daemon
    return build_config(raw)


def errors(models, daemon=None):
    with pytest.raises(ConfigError) as info:
        cfg(models, daemon)
    return info.value.errors


def m(port, **kw):
    return {"model_path": "x/y", "port": port, **kw}


def test_defaults_are_off_and_auto():
    c = cfg({"a": m(8001)})
    a = c.models["a"]
    assert (a.prewarm, a.idle_sleep_secs, a.keep_active) == (False, 0.0, False)
    assert c.daemon.host_memory_limit == "auto"


def test_values_load_and_round_trip_through_check_config_output():
    c = cfg({"a": m(8001, sleep_level=1, prewarm=True),
             "b": m(8002, idle_sleep_secs=300, sleep_level=2),
             "k": m(8003, keep_active=True, gpu_memory_utilization=0.05)},
            {"host_memory_limit": 64 << 30})
    assert c.models["a"].prewarm and c.models["b"].idle_sleep_secs == 300.0
    assert c.models["k"].keep_active
    assert c.daemon.host_memory_limit == str(64 << 30)
    data = c.to_dict()
    data.pop("source")
    again = build_config(tomllib.loads(tomlout.dumps(data)))
    assert again.models == c.models and again.daemon == c.daemon


@pytest.mark.parametrize("value", ["64GiB", "80%", "auto", "1000000"])
def test_host_memory_limit_forms(value):
    assert cfg({"a": m(8001)}, {"host_memory_limit": value}).daemon.host_memory_limit == value


@pytest.mark.parametrize("value", ["lots", "150%", "0", True, 1.5, [1]])
def test_host_memory_limit_refused_with_its_path(value):
    (err,) = errors({"a": m(8001)}, {"host_memory_limit": value})
    assert err.startswith("daemon.host_memory_limit: must be \"auto\", a byte count")


def test_prewarm_needs_a_level_that_keeps_the_process():
    assert errors({"a": m(8001, prewarm=True, sleep_level=3)}) == [
        "models.a.prewarm: needs sleep_level 1 or 2 (a model asleep at level 3 is "
        "stopped: nothing to prewarm)"]
    assert errors({"a": m(8001, prewarm=True, sleep_level=1, enable_sleep_mode=False)}) == [
        "models.a.prewarm: needs enable_sleep_mode = true"]


def test_keep_active_conflicts_with_ttl_and_prewarm():
    errs = errors({"a": m(8001, keep_active=True, idle_sleep_secs=5)})
    assert errs == ["models.a.idle_sleep_secs: conflicts with keep_active = true (a "
                    "keep_active model never goes to sleep)"]
    errs = errors({"a": m(8001, keep_active=True, prewarm=True, sleep_level=1)})
    assert errs and errs[0].startswith("models.a.prewarm: has no effect with keep_active")


def test_negative_idle_sleep_secs_and_wrong_types():
    assert errors({"a": m(8001, idle_sleep_secs=-1)}) == [
        "models.a.idle_sleep_secs: must not be negative (0 = never)"]
    assert errors({"a": m(8001, keep_active="yes")}) == [
        "models.a.keep_active: must be true or false (got \"yes\")"]


def test_keep_active_models_must_fit_and_leave_room_for_the_others():
    errs = errors({"k": m(8001, keep_active=True, gpu_memory_utilization=0.6),
                   "j": m(8002, keep_active=True, gpu_memory_utilization=0.6)})
    assert errs == ["models: the keep_active models (k, j) need 1.2 of GPU 0 together "
                    "(more than 1)"]
    errs = errors({"k": m(8001, keep_active=True, gpu_memory_utilization=0.5),
                   "a": m(8002, gpu_memory_utilization=0.9)})
    assert errs == ["models.a: can never run: the keep_active models (k) hold 0.5 of GPU 0 "
                    "and it needs 0.9"]
    # Another GPU is fine.
    cfg({"k": m(8001, keep_active=True, gpu_memory_utilization=0.9, gpus=[0]),
         "a": m(8002, gpu_memory_utilization=0.9, gpus=[1])})


def test_upkeep_keys_apply_in_place_and_others_restart():
    # A reload that changes only the upkeep keys keeps the child (switching.IN_PLACE).
    base = cfg({"a": m(8001, sleep_level=1)}).models["a"]
    tuned = cfg({"a": m(8001, sleep_level=1, prewarm=True, idle_sleep_secs=9)}).models["a"]
    assert tuned != base and not needs_restart(base, tuned)
    moved = cfg({"a": m(8002, sleep_level=1)}).models["a"]
    assert needs_restart(base, moved)
