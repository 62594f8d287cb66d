"""Chaos, compressed for CI: steady traffic from 30 sessions while backends
are killed and restarted and the store freezes with a kill inside it.

The scenario and its judgement are tests/chaos.py's (`CI_PLAN`, `judge`),
shared with the hand-run soak (tests/soak), which plays the same scenario for
many minutes. The outage policy is "reject", so no session may be lost: a
session that gets 503 + Retry-After during the store outage retries after
Retry-After and continues its count. What the judgement allows and refuses:

- no session ever gets another session's state (the demo app refuses it and
  counts it in /stats, read from every backend, killed ones before the kill);
- every session's count continues; only a session whose host was killed while
  the store was frozen may go back, and only to what was stored before the
  freeze (its changes during the freeze were not protected: counted as
  store.writes_unprotected);
- no 5xx, except 503 + Retry-After during the store outage;
- p99 of plain answers while the store is frozen (once the breaker opened)
  stays within a small multiple of the p99 before any fault.
"""

from __future__ import annotations

from chaos import CI_PLAN, judge, rules_for, run
from harness import Checks, expect_equal, settle_load_balancer, with_config

SESSIONS = 30
P99_RATIO_LIMIT = 2.5


def test_chaos(own_testbed):
    bed, envoy = own_testbed, own_testbed.envoy
    config = with_config(envoy.filter_config, store={"on_outage": "reject"})
    envoy.restart(config)
    settle_load_balancer(envoy)
    outcome = run(bed, SESSIONS, CI_PLAN.run, say=print)
    expect_equal(outcome.stuck, [], "sessions still running after stop")
    print(outcome.summary.table())
    problems, figures = judge(outcome.summary, outcome.faults, rules_for(config, P99_RATIO_LIMIT))
    delta = outcome.counters
    print(f"figures {figures}\ncounters {delta}")
    checks = Checks()
    checks.expect_equal(problems, [], f"what the sessions saw ({figures})")
    # The counters say what happened.
    for name in ("store.breaker_opened", "store.writes_unprotected", "store.timeouts", "failovers.rejected",
                 "failovers.restored", "gone.marked"):
        checks.expect(delta.get(name, 0) > 0, f"{name} ({delta})", "> 0", delta.get(name, 0))
    for name in ("failovers.fresh", "store.writes_rejected", "store.replies_mismatched"):
        checks.expect_equal(delta.get(name, 0), 0, f"{name} ({delta})")
    checks.done()

