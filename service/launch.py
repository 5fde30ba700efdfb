"""``teacher-serve`` as a child process on a free loopback port: start it, wait for ready, stop it.

One home for what the demo, the benchmarks and the end-to-end tests all do. Nothing here
imports the server itself; the child is a real process, so a test can ``kill -9`` it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


class LaunchError(Exception):
    """The server exited or did not become ready; the message ends with its log's last line."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command() -> list[str]:
    """``teacher-serve`` next to this interpreter (a venv's bin), else on PATH, else ``-m service``."""
    local = Path(sys.executable).parent / "teacher-serve"
    if local.exists():
        return [str(local)]
    found = shutil.which("teacher-serve")
    return [found] if found else [sys.executable, "-m", "kdcache.service"]


class ServeProcess:
    """A ``teacher-serve`` child whose stdout and stderr go to ``log_path``.

    ``args`` are the server's options without ``--port``; ``command`` replaces the program (for
    example ``[sys.executable, "-m", "kdcache.service"]``); ``env`` is added to this process's
    environment."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [*(command or serve_command()), "--port", str(self.port), *args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def last_line(self) -> str:
        lines = [line for line in self.output().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"teacher-serve exited with {self.proc.returncode}: {self.last_line()} (log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise LaunchError(f"teacher-serve not ready after {timeout:.0f} s: {self.last_line()} (log: {self.log_path})")

    def memory(self, field: str = "VmRSS") -> int:
        """Bytes of ``field`` in /proc/PID/status (VmRSS now, VmHWM the peak) while the child
        runs; 0 where /proc lacks it."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def kill(self) -> int:
        """``kill -9``: no clean-up of any kind runs in the child."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self._finish(self.proc.wait())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` (SIGTERM drains and publishes), wait, and kill it if it does not exit in
        time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return self._finish(code)

    def _finish(self, code: int) -> int:
        if not self._log.closed:
            self._log.close()
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
