"""llmuxctl status lines for prewarm, keep-active and host memory (pure)."""

from __future__ import annotations

from llmuxctl.upkeep_lines import upkeep_lines

GIB = 1 << 30


def test_lines_for_prewarm_keep_active_and_memory():
    status = {
        "upkeep": {"prewarm": {"current": "b", "pending": ["c"],
                               "models": {"a": "done: asleep at level 1", "b": "starting"}},
                   "keep_active": ["k"], "idle_sleep_secs": {}},
        "memory": {"models_bytes": 3 * GIB, "limit_bytes": 20 * GIB,
                   "limit_how": "auto: leave 10% of RAM free",
                   "host_available_bytes": 17 * GIB,
                   "recent_actions": [{"action": "demote_l2", "model": "a", "why": "over"}]},
    }
    assert upkeep_lines(status) == [
        "prewarm: a done: asleep at level 1; b starting; c pending",
        "keep active: k",
        "host RAM: models hold 3.0 GiB of 20.0 GiB (auto: leave 10% of RAM free; "
        "17.0 GiB available)",
        "memory: demote_l2 a: over",
    ]


def test_no_lines_from_an_older_daemon():
    assert upkeep_lines({"models": {}}) == []
    assert upkeep_lines({"upkeep": {"prewarm": {"models": {}, "pending": []},
                                    "keep_active": []},
                         "memory": {"limit_bytes": None}}) == []
