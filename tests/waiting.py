"""The one way tests wait: poll a condition until it holds or a deadline passes.

Every test (and the benchmarks) waits through :func:`wait_for`, so a wait that
times out always says what it waited for and the state it last saw, and no
test stands a ``time.sleep`` in for a condition.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import httpx

#: How long a test's client waits for one model request: the endpoint's own bound
#: (``request_timeout_s``, 600 s by default), so a test never gives up on a request the
#: server still works on. A request that must be fast is a benchmark's figure, not a
#: client timeout; on a shared 2-core machine a first answer has taken over 120 s.
REQUEST_TIMEOUT_S = 600.0


def wait_for(pred: Callable[[], object], timeout: float, what: str, poll: float = 1.0,
             state: Callable[[], object] = lambda: "") -> float:
    """Poll ``pred`` until it returns something true; return the seconds it took.

    On timeout raise ``TimeoutError`` naming ``what`` and ``state()`` (the last
    thing seen, for the failure message). An HTTP error while polling (an
    endpoint not up yet, a dashboard or controller busy for a moment) counts
    as not yet.
    """
    t0 = time.monotonic()
    while True:
        try:
            if pred():
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s; {state()}")
        time.sleep(poll)


def wait_healthy(base: str, timeout: float, poll: float = 2.0) -> float:
    """Wait until ``{base}/health`` answers 200; return the seconds it took."""
    last: list[str] = [""]

    def healthy() -> bool:
        try:
            r = httpx.get(f"{base}/health", timeout=15)
        except httpx.HTTPError as exc:
            last[0] = repr(exc)
            return False
        last[0] = r.text[:500]
        return r.status_code == 200

    return wait_for(healthy, timeout, f"{base}/health answering 200", poll=poll, state=lambda: last[0])


def stop_like_ctrl_c(proc: subprocess.Popen, grace_s: float) -> None:
    """End a foreground ``fleetserve serve`` as Ctrl-C does (it deletes its app and stops the Ray head
    it started); its whole process group is killed if it has not exited within ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
