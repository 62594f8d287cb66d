"""Steady traffic from many browser-like sessions while processes fail: the
engine behind tests/test_chaos.py, tests/test_store_faults.py and tests/soak.

- `Traffic`: every session is a `harness.User` (its own cookie jar; follows
  307s like a browser) in its own thread: a GET, a think time, again. A 503
  with Retry-After is retried after Retry-After, as a careful client does.
  Every request leaves a `Record`, labelled with the phase it started in.
- `Faults`: kills, restarts and freezes the testbed's processes, each event
  starting a new phase; it reads a backend's /stats before killing it, so no
  refused foreign state is forgotten with the process.
- `Plan`: the chaos scenario as a timetable (kill cycles, one with the store
  frozen around its kill), run by `Plan.run`.
- `Summary`: what the records say, per phase and per session (the demo app
  counts a session's requests, so a count that does not continue shows a lost
  session, lost changes or someone else's state); `judge` holds them against
  the `Rules` of a run.
- `run`: traffic through a testbed while a plan plays, with the filter's
  counter changes.

Times are seconds on the monotonic clock since the traffic started.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import requests

from harness import Paused, User, changes, json_body, settled_counters, tb

THINK = (0.020, 0.050)
RETRY_AFTER_CAP = 3.0
REQUEST_TIMEOUT = 10.0
JOIN_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Record:
    """One request as its client saw it (after following redirects)."""

    session: int
    phase: str
    start: float
    latency: float
    status: int  # 0 when the request raised
    redirects: int
    retry_after: float | None  # on a 503 with Retry-After
    count: int | None  # the demo app's count of the session's requests
    backend: str | None
    detail: str  # what went wrong, for anything but a 200 with a count


class Traffic:
    """`sessions` users sending GETs to `url` until stopped, each in its own thread."""

    def __init__(self, url: str, sessions: int, think: tuple[float, float] = THINK, seed: int = 1):
        self.url = url
        self.users = [User(f"s{i}") for i in range(sessions)]
        self.think = think
        self.seed = seed
        self.records: list[Record] = []
        self.phases: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = time.monotonic()
        self.phase("steady")

    def now(self) -> float:
        return time.monotonic() - self.started

    def phase(self, name: str) -> float:
        """Requests started from now on belong to phase `name`; returns its start."""
        at = self.now()
        with self._lock:
            self.phases.append((at, f"{len(self.phases)} {name}"))
        return at

    def current_phase(self) -> str:
        with self._lock:
            return self.phases[-1][1]

    def start(self) -> "Traffic":
        for index, user in enumerate(self.users):
            thread = threading.Thread(target=self._run, args=(index, user), name=user.name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> list[str]:
        """Stops every session; names those still running after JOIN_TIMEOUT."""
        self._stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _run(self, index: int, user: User):
        rng = random.Random(self.seed * 100_003 + index)
        while not self._stop.is_set():
            record = self._request(index, user)
            with self._lock:
                self.records.append(record)
            pause = record.retry_after if record.retry_after is not None else rng.uniform(*self.think)
            self._stop.wait(pause)

    def _request(self, index: int, user: User) -> Record:
        phase, start = self.current_phase(), self.now()
        try:
            reply = user.send(self.url, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as err:
            return Record(index, phase, start, self.now() - start, 0, 0, None, None, None, repr(err)[:200])
        latency = self.now() - start
        del user.replies[:]  # the records keep what matters; a soak would grow without bound
        body = json_body(reply) or {}
        count = body.get("count") if reply.status_code == 200 else None
        retry_after = None
        if reply.status_code == 503 and reply.headers.get("retry-after", "").isdigit():
            retry_after = min(float(reply.headers["retry-after"]), RETRY_AFTER_CAP)
        detail = "" if isinstance(count, int) else f"{reply.status_code} {reply.text[:160]!r}"
        return Record(index, phase, start, latency, reply.status_code, len(reply.history), retry_after,
                      count if isinstance(count, int) else None, body.get("backend"), detail)

    def snapshot(self) -> tuple[list[Record], list[tuple[float, str]]]:
        """The records so far (by start time) and the phases."""
        with self._lock:
            return sorted(self.records, key=lambda r: r.start), list(self.phases)

    def wait_for_progress(self, after: float, timeout: float) -> list[int]:
        """Waits until every session has a 200 that started after `after`;
        returns the sessions that have none when the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                done = {r.session for r in self.records if r.start >= after and r.count is not None}
            missing = [i for i in range(len(self.users)) if i not in done]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)


class Faults:
    """Kills, restarts and freezes testbed processes; each event starts a phase."""

    def __init__(self, bed: "tb.Testbed", traffic: Traffic, say=lambda message: None):
        self.bed = bed
        self.traffic = traffic
        self.say = say
        self.frozen: Paused | None = None
        self.foreign_seen_by_dead = 0
        self.events: list[tuple[float, str]] = []

    def _event(self, name: str) -> float:
        at = self.traffic.phase(name)
        self.events.append((at, name))
        self.say(f"{at:6.1f}s {name}")
        return at

    def kill(self, name: str) -> float:
        backend = self.bed.backend_named(name)
        self.foreign_seen_by_dead += backend_stats(backend).get("foreign_states", 0)
        self.bed.kill_backend(self.bed.backends.index(backend))
        return self._event(f"kill {name}" + (" (store frozen)" if self.frozen else ""))

    def restart(self, name: str) -> float:
        self.bed.start_backend(self.bed.backends.index(self.bed.backend_named(name)))
        return self._event(f"restart {name}" + (" (store frozen)" if self.frozen else ""))

    def freeze_store(self) -> float:
        """SIGSTOP webdis: connections are accepted by the kernel and never answered."""
        self.frozen = Paused(self.bed.webdis).pause()
        return self._event("store frozen")

    def thaw_store(self) -> float | None:
        """SIGCONT webdis, if frozen; None if it was not."""
        if not self.frozen:
            return None
        self.frozen.resume()
        self.frozen = None
        return self._event("store thawed")

    def foreign_states(self) -> int:
        """Restored states of another session that any backend refused, killed ones included."""
        running = [b for b in self.bed.backends if b.process.running()]
        return self.foreign_seen_by_dead + sum(backend_stats(b).get("foreign_states", 0) for b in running)


def backend_stats(backend: "tb.Backend") -> dict:
    """The demo backend's GET /stats, straight from the process (not through Envoy)."""
    status, _, body = tb.http_get(f"http://{backend.address}/stats")
    return json.loads(body) if status == 200 else {}


# ----------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Kill cycles: every `kill_every` s a backend (in turn) is killed and
    restarted `restart_after` s later. In the middle cycle the store is frozen
    for `freeze` s from the cycle's start, and that cycle's kill comes
    `freeze_kill_at` s into the freeze. `warmup` s of steady traffic first,
    `cooldown` s after the last cycle."""

    cycles: int
    kill_every: float
    restart_after: float
    freeze: float
    freeze_kill_at: float
    warmup: float
    cooldown: float

    @property
    def freeze_cycle(self) -> int:
        return self.cycles // 2

    @property
    def duration(self) -> float:
        return self.warmup + self.cycles * self.kill_every + self.cooldown

    def timetable(self, names: list[str]) -> list[tuple[float, str, str]]:
        """(at, action, backend name) sorted by time; actions: kill, restart, freeze, thaw."""
        events = []
        for cycle in range(self.cycles):
            start = self.warmup + cycle * self.kill_every
            name = names[cycle % len(names)]
            kill_at = start
            if cycle == self.freeze_cycle:
                events += [(start, "freeze", ""), (start + self.freeze, "thaw", "")]
                kill_at = start + self.freeze_kill_at
            events += [(kill_at, "kill", name), (kill_at + self.restart_after, "restart", name)]
        return sorted(events, key=lambda e: (e[0], e[1] != "thaw"))

    def run(self, faults: Faults) -> None:
        """Plays the timetable against the running traffic, then the cooldown."""
        actions = {"kill": faults.kill, "restart": faults.restart,
                   "freeze": lambda _: faults.freeze_store(), "thaw": lambda _: faults.thaw_store()}
        began = faults.traffic.now()
        try:
            for at, action, name in self.timetable([b.name for b in faults.bed.backends]):
                time.sleep(max(0.0, began + at - faults.traffic.now()))
                actions[action](name)
            time.sleep(max(0.0, began + self.duration - faults.traffic.now()))
        finally:
            faults.thaw_store()


CI_PLAN = Plan(cycles=3, kill_every=14, restart_after=6, freeze=8, freeze_kill_at=2.5, warmup=5, cooldown=6)
SOAK_PLAN = Plan(cycles=15, kill_every=40, restart_after=10, freeze=20, freeze_kill_at=5, warmup=10, cooldown=10)


# ------------------------------------------------------------------ summary

def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(share * len(ordered) + 0.5) - 1))]


@dataclass
class Continuity:
    """How one session's counts went: each 200 should be the previous + 1."""

    lost: list[Record]  # the count started again at 1: the session was lost
    rolled_back: list[tuple[int, Record]]  # (previous count, record): changes lost
    skipped: list[tuple[int, Record]]  # (previous count, record): counts appeared from nowhere


class Summary:
    """What a run's records say."""

    def __init__(self, traffic: Traffic):
        self.records, self.phases = traffic.snapshot()
        self.sessions = len(traffic.users)

    def between(self, start: float, end: float = float("inf")) -> list[Record]:
        return [r for r in self.records if start <= r.start < end]

    @staticmethod
    def p99_pinned(records: list[Record]) -> float | None:
        """p99 latency of plain answers: 200 with a count and no redirect (every
        one of them wrote the session's state)."""
        return percentile([r.latency for r in records if r.count is not None and not r.redirects], 0.99)

    def continuity(self) -> Continuity:
        result = Continuity([], [], [])
        last: dict[int, int] = {}
        for record in self.records:
            if record.count is None:
                continue
            previous = last.get(record.session)
            last[record.session] = record.count
            if previous is None:
                if record.count != 1:
                    result.skipped.append((0, record))
            elif record.count == 1:
                result.lost.append(record)
            elif record.count <= previous:
                result.rolled_back.append((previous, record))
            elif record.count > previous + 1:
                result.skipped.append((previous, record))
        return result

    def last_count_before(self, at: float) -> dict[int, int]:
        """Each session's count in its last answer that arrived before `at`."""
        counts = {}
        for record in self.records:
            if record.count is not None and record.start + record.latency < at:
                counts[record.session] = record.count
        return counts

    def errors(self, records: list[Record]) -> list[Record]:
        """Everything but a 200 with a count and a 503 with Retry-After."""
        return [r for r in records if r.count is None and r.retry_after is None]

    def table(self) -> str:
        """Requests, outcomes and latency per phase."""
        rows = [f"{'phase':32} {'start':>7} {'reqs':>6} {'200':>6} {'307d':>5} {'503+RA':>6} {'errors':>6} "
                f"{'p50 ms':>7} {'p99 ms':>7}"]
        bounds = [start for start, _ in self.phases[1:]] + [float("inf")]
        for (start, name), end in zip(self.phases, bounds):
            chunk = self.between(start, end)
            ok = [r for r in chunk if r.count is not None]
            latencies = [r.latency * 1000 for r in ok]
            p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
            rows.append(f"{name[:32]:32} {start:7.1f} {len(chunk):6} {len(ok):6} "
                        f"{sum(1 for r in ok if r.redirects):5} {sum(1 for r in chunk if r.retry_after is not None):6} "
                        f"{len(self.errors(chunk)):6} {fmt(p50):>7} {fmt(p99):>7}")
        return "\n".join(rows)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------ verdict

@dataclass(frozen=True)
class Rules:
    """What a run may show. `outage_grace`: how long after a thaw 503s with
    Retry-After are still the outage's (the breaker's cooldown, leases taken by
    calls the frozen store ran late). `p99_limit`: the p99 of plain answers
    while the store is frozen (once the breaker opened) over the p99 before
    any fault."""

    store_timeout: float
    outage_grace: float
    p99_limit: float


def rules_for(filter_config: dict, p99_limit: float) -> Rules:
    """The rules of a run under this plugin config: 503s with Retry-After may
    come until the breaker's cooldown (plus two store timeouts and 2 s) after a
    thaw. The filter's defaults where the config sets none."""
    store = filter_config.get("store", {})
    timeout = seconds(store.get("timeout", "500ms"))
    cooldown = seconds(store.get("breaker", {}).get("cooldown", "5s"))
    return Rules(timeout, outage_grace=cooldown + 2 * timeout + 2.0, p99_limit=p99_limit)


def seconds(duration: str) -> float:
    """A plugin config duration ("500ms", "5s", "2m") in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if duration.endswith(suffix) and duration[:-len(suffix)].isdigit():
            return int(duration[:-len(suffix)]) * scale
    raise ValueError(f"not a duration: {duration!r}")


def frozen_windows(faults: Faults) -> list[tuple[float, float]]:
    windows, start = [], None
    for at, name in faults.events:
        if name == "store frozen":
            start = at
        elif name == "store thawed" and start is not None:
            windows.append((start, at))
            start = None
    return windows


def judge(summary: Summary, faults: Faults, rules: Rules) -> tuple[list[str], dict]:
    """The problems a run shows (empty: none) and its figures."""
    problems = []
    windows = frozen_windows(faults)
    foreign = faults.foreign_states()
    if foreign:
        problems.append(f"{foreign} restored state(s) of another session reached a backend")
    continuity = summary.continuity()
    for record in continuity.lost:
        problems.append(f"session {record.session} lost: count 1 again in phase {record.phase!r}")
    for previous, record in continuity.skipped:
        problems.append(f"session {record.session}: count {record.count} after {previous} in phase {record.phase!r}")
    allowed = rollback_floors(summary, faults, windows)
    for previous, record in continuity.rolled_back:
        floor = allowed.get(record.session)
        if floor is None or record.count < floor + 1:
            problems.append(f"session {record.session}: count {record.count} after {previous} in phase "
                            f"{record.phase!r}; only changes made while the store was frozen may be lost"
                            + (f" (stored before the freeze: {floor})" if floor is not None else ""))
    for record in summary.errors(summary.records):
        problems.append(f"session {record.session}: {record.detail or record.status} in phase {record.phase!r}")
    for record in summary.records:
        answered = record.start + record.latency
        if record.retry_after is not None and not any(s <= answered < e + rules.outage_grace for s, e in windows):
            problems.append(f"session {record.session}: 503 + Retry-After outside a store outage, "
                            f"{answered:.1f}s, phase {record.phase!r}")
    last_event = max((at for at, _ in faults.events), default=0.0)
    answered = {r.session for r in summary.records if r.count is not None and r.start > last_event}
    stalled = sorted(set(range(summary.sessions)) - answered)
    if stalled:
        problems.append(f"sessions without an answer after the last event: {stalled}")
    figures = latency_figures(summary, faults, windows, rules)
    ratio = figures.get("p99 frozen / before")
    if ratio is not None and ratio > rules.p99_limit:
        problems.append(f"p99 while the store was frozen is {ratio:.2f} x the p99 before any fault "
                        f"(limit {rules.p99_limit})")
    return problems, {**figures, "foreign states": foreign, "sessions on hosts killed while frozen": len(allowed),
                      "rolled back": len(continuity.rolled_back),
                      "changes lost": sum(p + 1 - r.count for p, r in continuity.rolled_back)}


def rollback_floors(summary: Summary, faults: Faults, windows: list[tuple[float, float]]) -> dict[int, int]:
    """Sessions whose host was killed while the store was frozen, and the
    count their store record held: their last answer before the freeze."""
    floors = {}
    for start, end in windows:
        before_freeze = summary.last_count_before(start)
        for at, name in faults.events:
            if start <= at < end and name.startswith("kill "):
                victim = name.split()[1]
                homes = last_backend_before(summary, at)
                floors.update({s: before_freeze.get(s, 0) for s, home in homes.items() if home == victim})
    return floors


def last_backend_before(summary: Summary, at: float) -> dict[int, str]:
    homes = {}
    for record in summary.records:
        if record.backend and record.start + record.latency < at:
            homes[record.session] = record.backend
    return homes


def latency_figures(summary: Summary, faults: Faults, windows, rules: Rules) -> dict:
    """p99 of plain answers before any fault, and while the store was frozen
    after the breaker had opened (2 store timeouts into the freeze)."""
    first_event = min((at for at, _ in faults.events), default=float("inf"))
    before = summary.p99_pinned(summary.between(min(2.0, first_event / 2), first_event))
    figures = {"p99 before ms": before and before * 1000}
    frozen = [r for s, e in windows for r in summary.between(s + 2 * rules.store_timeout, e)]
    p99_frozen = summary.p99_pinned(frozen)
    if before and p99_frozen:
        figures.update({"p99 frozen ms": p99_frozen * 1000, "p99 frozen / before": p99_frozen / before})
    return figures


# --------------------------------------------------------------------- a run

@dataclass
class Outcome:
    summary: Summary
    faults: Faults
    counters: dict[str, int]  # the filter's counter changes over the scenario
    stuck: list[str]  # sessions that did not stop


def run(bed: "tb.Testbed", sessions: int, scenario: Callable[[Faults], None], say=lambda message: None) -> Outcome:
    """`sessions` sessions of steady traffic through the testbed's Envoy
    while `scenario` (a `Plan.run`, or a test's own) plays its faults."""
    envoy = bed.envoy
    traffic = Traffic(envoy.url, sessions).start()
    faults = Faults(bed, traffic, say)
    try:
        missing = traffic.wait_for_progress(0.0, 30.0)
        if missing:
            raise RuntimeError(f"sessions without a first answer within 30s: {missing}")
        before = envoy.filter_counters()
        scenario(faults)
    finally:
        faults.thaw_store()
        stuck = traffic.stop()
    return Outcome(Summary(traffic), faults, changes(before, settled_counters(envoy)), stuck)
