"""proxy.api_keys_file through a real llmuxd and its gunicorn front end: the keys of
the file are enforced, and a reload picks up a changed file (no restart)."""

from __future__ import annotations

import http.client
import tomllib

from llmux_testkit.daemon import sim_model


def _models_status(port: int, key: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        conn.request("GET", "/v1/models", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_keys_from_the_file_are_enforced_and_reread_on_reload(make_daemon, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("# keys\nsk-first\n")
    keys.chmod(0o600)
    d = make_daemon({"a": sim_model()}, frontend=True,
                    config={"proxy": {"api_keys": ["sk-inline"], "api_keys_file": str(keys)}})
    port = tomllib.loads(d.config_path.read_text())["port"]
    assert _models_status(port, None) == 401
    assert _models_status(port, "sk-first") == 200
    assert _models_status(port, "sk-inline") == 200

    keys.write_text("sk-second\n")
    code, body = d.request("POST", "/v1/reload")
    assert code == 200, body
    # gunicorn replaces its workers on the reload, and an old one serves until it is
    # stopped (CI once saw the old key accepted right after the new one was): poll
    # until the new key is accepted and the old one refused on ten new connections
    # in a row (the kernel spreads them over the workers).
    d.wait_for(lambda: _models_status(port, "sk-second") == 200, timeout=60,
               what="the front end to accept the key added to the file")
    d.wait_for(lambda: all(_models_status(port, "sk-first") == 401 for _ in range(10)),
               timeout=60, what="every worker to refuse the key removed from the file")
    assert _models_status(port, "sk-inline") == 200
