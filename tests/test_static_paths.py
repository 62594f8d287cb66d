"""Paths in skip.prefixes / skip.suffixes (static assets) neither get nor need
a cookie, are load-balanced, and still cannot carry internal headers."""

from __future__ import annotations

from collections import Counter as Tally

from harness import Counters, INTERNAL_HEADERS, expect, expect_equal

REASONS = ("malformed", "unknown_key", "bad_signature", "expired")
FORGED_INTERNALS = {name: "forged" for name in INTERNAL_HEADERS}


def test_static_prefix_gets_no_cookie(client, testbed, filter_config):
    prefix = filter_config["skip"]["prefixes"][0]
    counters = Counters(testbed.envoy)
    for path in (f"{prefix}app.css", f"{prefix}logo.png?v=3", f"{prefix}deep/file.txt"):
        reply = client.get(path)
        expect_equal(reply.status, 200, f"GET {path}")
        expect_equal(reply.set_cookies, [], f"Set-Cookie on {path}")
        expect(reply.response.text.startswith(f"/* {path.split('?')[0]} from "), "the static body",
               "a file-like body", reply.response.text)
    counters.expect({"sessions.skipped": 3, "sessions.created": 0})


def test_static_paths_ignore_bad_cookies(client, testbed, filter_config):
    prefix = filter_config["skip"]["prefixes"][0]
    counters = Counters(testbed.envoy)
    reply = client.get(f"{prefix}app.js", cookie="garbage")
    expect_equal((reply.status, reply.set_cookies), (200, []), "a bad cookie on a static path (status, Set-Cookie)")
    counters.expect({"sessions.skipped": 1, "sessions.created": 0} | {f"cookies.rejected.{r}": 0 for r in REASONS})


def test_static_suffixes_carry_no_session(client, testbed, filter_config):
    """Suffix matches reach the app's counter, which shows what arrived."""
    session = client.new_session()
    served = Tally()
    for suffix in filter_config["skip"]["suffixes"]:
        for _ in range(3):
            reply = client.get(f"/assets/site{suffix}", cookie=session.cookie, headers=FORGED_INTERNALS)
            body = reply.body
            served[body["backend"]] += 1
            expect_equal(reply.set_cookies, [], f"Set-Cookie on /assets/site{suffix}")
            expect_equal((body["session"], body["received"]), (None, {}),
                         f"session and internal headers the app saw on /assets/site{suffix}")
    expect_equal(sorted(served), sorted(b.name for b in testbed.backends),
                 "static requests are load-balanced even with a session cookie")


def test_query_string_does_not_make_a_path_static(client, filter_config):
    suffix = filter_config["skip"]["suffixes"][0]
    reply = client.get(f"/page?download=report{suffix}")
    expect(reply.cookie is not None, f"/page?download=report{suffix} is an app path and gets a cookie",
           "a Set-Cookie", reply.describe())
