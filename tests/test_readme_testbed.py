"""The README's testbed walkthrough, step by step, as a user would do it.

The commands are read from README.md, so the documentation and this test
cannot drift apart: start `envoy/testbed`, wait for its "ready at" line, run
the documented curl commands (killing the backend that answered where the
README says to), then Ctrl-C and check that everything it started is gone.

The documented ports are used when they are free. When they are taken (a
developer's testbed is running) the test adds --free-ports, and substitutes
the printed URL in the curl commands.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time

import pytest

from harness import REPO, expect, expect_equal, require_tool, tb

README = REPO / "README.md"
DOCUMENTED_URL = "http://127.0.0.1:10000"
READY = re.compile(r"ready at (http://127\.0\.0\.1:\d+)/")
STARTED = re.compile(r"started (\S+(?: \S+)?) pid (\d+)")
START_TIMEOUT = 120


def readme_blocks() -> list[list[str]]:
    """Lines of every fenced sh code block in README.md."""
    return [block.strip("\n").splitlines() for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)]


def documented_steps() -> tuple[list[str], list[str]]:
    """The testbed command, and the walkthrough (curl lines and comment steps)."""
    blocks = readme_blocks()
    start = next(line for block in blocks for line in block if line.startswith("envoy/testbed"))
    walkthrough = next(block for block in blocks if any(line.startswith("curl ") for line in block))
    return shlex.split(start.split("#", 1)[0]), walkthrough


class Output:
    """The runner's output lines, read on a thread so every wait is bounded."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _read(self, timeout: float, pattern: re.Pattern | None = None) -> re.Match | None:
        """Collects output lines until one matches `pattern`, the output ends, or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if pattern is not None and (match := pattern.search(line)):
                return match
        return None

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        match = self._read(timeout, pattern)
        if match is None:
            pytest.fail(f"no line matching {pattern.pattern!r} within {timeout}s; output:\n" + "\n".join(self.lines))
        return match

    def drain(self, timeout: float = 5.0) -> str:
        self._read(timeout)
        return "\n".join(self.lines)


def documented_ports_free() -> bool:
    plan = tb.PortPlan()
    for port in (plan.listener, plan.admin, plan.webdis, plan.redis, *plan.backends):
        try:
            tb.accepts(port)
            return False
        except OSError:
            continue
    return True


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_readme_testbed_walkthrough(wasm, tmp_path):
    curl = require_tool("curl")
    command, walkthrough = documented_steps()
    if not documented_ports_free():
        command.append("--free-ports")
    runner = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    output = Output(runner.stdout)
    try:
        url = output.wait_for(READY, START_TIMEOUT).group(1)
        pids = {name: int(pid) for name, pid in (STARTED.search(line).groups()
                                                 for line in output.lines if STARTED.search(line))}
        expect_equal(sorted(pids), ["backend a", "backend b", "backend c", "envoy", "redis", "webdis"],
                     "processes the testbed reports")
        follow_walkthrough(walkthrough, url, curl, pids, tmp_path)
    finally:
        log = interrupt(runner, output)
    expect_equal(runner.returncode, 0, f"exit code after SIGINT; output:\n{log}")
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    expect_equal({name: pid for name, pid in pids.items() if alive(pid)}, {}, "processes still running after Ctrl-C")


def interrupt(runner: subprocess.Popen, output: Output) -> str:
    """Ctrl-C for the runner; checks it stopped everything in time. Returns its output."""
    if runner.poll() is None:
        runner.send_signal(signal.SIGINT)
    try:
        runner.wait(30)
    except subprocess.TimeoutExpired:
        runner.kill()
        pytest.fail("envoy/testbed did not exit within 30 s of SIGINT:\n" + output.drain())
    log = output.drain()
    expect(log.rstrip().endswith("testbed: stopped"), "the runner says it stopped", "testbed: stopped", log[-500:])
    return log


def follow_walkthrough(steps: list[str], url: str, curl: str, pids: dict[str, int], workdir):
    """Run the README's curl lines in order; a '# kill ...' comment kills the last backend that answered."""
    last_body = None
    ran = 0
    for step in steps:
        if step.startswith("#"):
            if "kill" in step:
                expect(last_body is not None, "a request before the kill step", "a backend answer", last_body)
                os.kill(pids[f"backend {last_body['backend']}"], signal.SIGKILL)
                # A person takes a moment before the next command. A request sent
                # in the very instant of the kill can ride a pooled connection that
                # Envoy has not yet seen close: that 503 (UC) is never replayed, by
                # design, since the request may have reached the app.
                time.sleep(1.0)
            continue
        shell_line, _, comment = step.partition("#")
        argv = [curl if word == "curl" else word.replace(DOCUMENTED_URL, url) for word in shlex.split(shell_line)]
        result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        expect(result.returncode == 0, f"README step {step!r}", "curl exit 0", f"{result.returncode} {result.stderr}")
        try:
            body = json.loads(result.stdout)
        except ValueError:
            pytest.fail(f"README step {step!r}: expected the backend's JSON, received {result.stdout[:300]!r}")
        check_documented_result(step, comment, body, last_body)
        last_body = body
        ran += 1
    expect(ran >= 3, "the README walkthrough has at least three requests", ">= 3", ran)


def check_documented_result(step: str, comment: str, body: dict, previous: dict | None):
    """What the README's comment promises: the count, and same or another backend."""
    count = re.search(r"count\"?:? (\d+)", comment)
    if count:
        expect_equal(body["count"], int(count.group(1)), f"count after README step {step!r}")
    if previous is not None and "same backend" in comment:
        expect_equal(body["backend"], previous["backend"], f"backend after README step {step!r}")
    if previous is not None and "another backend" in comment:
        expect(body["backend"] != previous["backend"], f"another backend after README step {step!r}",
               f"not {previous['backend']}", body["backend"])
