"""State writes through the real store, in both write modes: every state
change a response carries lands in Redis under the session's owner, the client
never sees the state header, and responses (bodies included) arrive whole."""

from __future__ import annotations

import pytest

from harness import User, expect_equal, tb
from harness import owner_of, stored, with_config


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_state_change_reaches_the_store_under_its_owner(own_testbed, mode):
    bed = own_testbed
    envoy = bed.envoy
    envoy.restart(with_config(envoy.filter_config, store={"write": mode}))
    client = User(envoy=envoy, jar=False)
    first = client.new_session()
    expect_equal(first.status, 200, "first response status")
    cookie = first.cookie
    for expected in range(2, 21):
        reply = client.get(cookie=cookie)
        expect_equal((reply.status, reply.body["count"]), (200, expected), "status and count")
        expect_equal(reply.headers.get("x-session-state"), None, "state header seen by the client")
    sid = first.body["session"]
    backend = bed.backend_named(first.body["backend"])

    def settled():
        return stored(bed, sid)["count"] == 20

    # async writes complete after their response: give them a moment
    tb.wait_until(settled, 5.0, f"the store to hold count 20 for {sid} ({mode})")
    record = stored(bed, sid)
    expect_equal(record["owner"], owner_of(backend), "owner recorded in the store")
    expect_equal(record["lease"], None, "lease left behind")
