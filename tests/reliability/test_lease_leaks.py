"""Leases cannot leak, through the real daemon (sim children): issue 12 findings."""

from __future__ import annotations

from llmux_testkit.daemon import sim_model
from tests.daemon.daemon_helpers import lease, release


def test_a_drain_that_times_out_revokes_the_leases_it_waited_for(make_daemon):
    """Before: the timed-out lease kept counting; every later drain of 'a' waited the
    full timeout again and ``GET /v1/leases`` listed it forever."""
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)},
                    config={"daemon": {"drain_timeout_secs": 1.0}})
    code, stuck = lease(d, "a")                 # never released: a leaked lease
    assert code == 200, stuck
    code, grant = lease(d, "b")                 # forces a's drain, which times out
    assert code == 200, grant
    assert d.log_events("drain_timeout")
    leases = d.request("GET", "/v1/leases")[1]["leases"]
    assert stuck["lease_id"] not in [x["lease_id"] for x in leases]
    code, body = d.request("POST", f"/v1/leases/{stuck['lease_id']}/release",
                           {"status": 200, "duration_ms": 1.0})
    assert code == 200, body
    assert "drain timed out" in body.get("revoked", ""), body
    release(d, grant["lease_id"])
    assert d.status("a")["in_flight"] == 0


def test_max_lease_secs_revokes_a_lease_held_too_long(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1)},
                    config={"daemon": {"max_lease_secs": 1.0}})
    code, held = lease(d, "a")
    assert code == 200, held
    d.wait_for(lambda: d.status("a")["in_flight"] == 0, timeout=30,
               what="the lease to be revoked at max_lease_secs")
    code, body = d.request("POST", f"/v1/leases/{held['lease_id']}/release",
                           {"status": 200, "duration_ms": 1.0})
    assert code == 200 and "max_lease_secs" in body.get("revoked", ""), body
