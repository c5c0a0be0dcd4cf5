"""Operations carry their own cleanup: a detached operation still undoes what it set up.

A real llmuxd on the simulator: a validate run is cut short by a kill (its
operation is detached, so its report is ignored). Its cleanup must still unpin
the model, end the job and answer the caller; before operations carried their
cleanup, the caller waited for its whole timeout and the model stayed pinned
("a validate run on 'a' is already going on").
"""

from __future__ import annotations

import threading
from typing import Any

from llmux_testkit.daemon import sim_model

from .daemon_helpers import leased_chat, set_faults


def test_kill_during_validate_answers_the_caller_and_frees_the_model(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1)},
                    config={"daemon": {"sleep_timeout_secs": 30.0}})
    leased_chat(d, "a")
    set_faults(d.status("a")["port"], {"sleep_hang": True})   # validate's L1 sleep hangs
    answer: dict[str, Any] = {}

    def run_validate() -> None:
        try:
            answer["reply"] = d.request("POST", "/v1/validate/a", {"levels": [1]},
                                        timeout=90.0)
        except Exception as exc:             # a timeout here is the failure we look for
            answer["error"] = repr(exc)

    t = threading.Thread(target=run_validate, daemon=True)
    t.start()
    d.wait_for(lambda: d.status("a")["operation"] == "validate", what="validate running")
    code, status = d.request("POST", "/v1/models/a/kill")
    assert code == 200 and status["state"] == "stopped", status
    t.join(timeout=60.0)
    assert not t.is_alive(), "the validate call was never answered after the kill"
    assert "error" not in answer, answer
    code, body = answer["reply"]
    assert (code, body["error"]["code"]) == (503, "model_failed"), body
    assert "cut short" in body["error"]["message"]
    # The job ended and the pin is gone: a new validate runs (on a fresh child).
    code, report = d.request("POST", "/v1/validate/a", {"levels": [1]})
    assert code == 200 and report["passed"] is True, report
    assert d.status("a")["state"] == "active"
