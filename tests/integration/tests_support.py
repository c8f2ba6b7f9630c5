"""Helpers for tests that start servers (loopback only, always stopped)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 90.0, alive: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers; fail at once if the server process ``alive`` exits."""
    deadline = time.time() + timeout_s
    last: Exception | None = None
    while time.time() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"server process exited with {alive.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as exc:  # answering, e.g. 401 under token auth
            if exc.code < 500:
                return
            last = exc
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s: {last}")


def stop_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
