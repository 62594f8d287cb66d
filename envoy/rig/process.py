"""One supervised child process: started in its own session with its output
in a log file, stopped by its PID, SIGTERMed by the kernel if the runner dies
(PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

from .paths import REPO
from .probe import StartupError

STOP_TIMEOUT = 5.0

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal
    _prctl = None


def _die_with_parent():
    """Runs in the child before exec: SIGTERM it when the runner goes away."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Process:
    """One child process, its log file, and nothing else: it is stopped by PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path = REPO, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self):
        if self.running():
            raise RuntimeError(f"{self.name} is already running as pid {self.pid}")
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            env = {**os.environ, **self.env} if self.env else None
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent, env=env,
            )

    def stop(self, timeout: float = STOP_TIMEOUT):
        """SIGTERM, then SIGKILL if it has not exited within timeout."""
        if not self.running():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        """SIGKILL: the process gets no chance to clean up, like a crashed pod."""
        if self.running():
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)

    def ensure_alive(self):
        """Raise with the log tail if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise StartupError(f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail(30)}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

