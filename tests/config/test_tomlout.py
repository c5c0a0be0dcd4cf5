"""tomlout writes TOML that tomllib reads back unchanged, whatever the names and values."""

from __future__ import annotations

import tomllib

import pytest

from llmuxd import tomlout
from llmuxd.config import build_config

NAMES = ["café", "модель", "模型", "🦙-llama", "a b", 'quote"d', "back\\slash", "dot.ted",
         "tab\there", "plain-name_1"]


@pytest.mark.parametrize("name", NAMES)
def test_model_names_round_trip_through_tomllib(name):
    data = {"port": 3000, "proxy": {"api_keys": ["k🔑", "é"]},
            "models": {name: {"model_path": f"/m/{name}", "port": 8001,
                              "env": {"GREETING": "héllo 👋", "NL": "a\nb"},
                              "extra_args": ["--x", "ü"]}}}
    text = tomlout.dumps(data)
    assert tomllib.loads(text) == data


def test_models_table_is_written_one_table_per_model():
    text = tomlout.dumps({"models": {"café": {"model_path": "x", "port": 1}}})
    assert '[models."café"]' in text


def test_check_config_output_of_a_unicode_config_loads_back():
    from llmuxd.cli import render_toml

    raw = {"models": {"café": {"model_path": "x", "port": 8001, "aliases": ["🦙"]}}}
    cfg = build_config(raw)
    again = build_config(tomllib.loads(render_toml(cfg)))
    assert again.to_dict() == cfg.to_dict()
