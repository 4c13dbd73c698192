"""A closed-loop load client on the real ``openai`` client, counting what happened to each request.

Shared by the scale and fault tests: what was sent, succeeded, retried (after a
503 the client waits Retry-After, as the ingress asks), failed or timed out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx

from waiting import wait_for

#: No request may wait longer than this; a timeout counts and fails the tests.
CLIENT_TIMEOUT_S = 60.0


@dataclass
class Counts:
    sent: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    status_503: int = 0
    status_503_with_retry_after: int = 0
    timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: What the 503s said (their first words), counted: which path turned requests away.
    reasons_503: dict[str, int] = field(default_factory=dict)
    max_latency_s: float = 0.0


class Load:
    """Closed-loop load: ``workers`` threads, each sending one chat request after another.

    A request answered 503 is retried after its Retry-After (capped at 2 s, up to
    3 times) -- the behaviour the ingress asks of clients; anything else that is
    not a 200 counts as failed.
    """

    def __init__(self, base_url: str, model: str, workers: int, max_tokens: int = 48, pause_s: float = 0.0,
                 api_key: str = "none"):
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, timeout=CLIENT_TIMEOUT_S, max_retries=0)
        self.model, self.workers, self.max_tokens = model, workers, max_tokens
        self.pause_s = pause_s  # think time between one client's requests
        self.counts = Counts()
        #: (wall-clock time, final status) of every request, for timelines.
        self.events: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def window(self) -> Counts:
        """Counts since the last call (and reset)."""
        with self._lock:
            out, self.counts = self.counts, Counts()
        return out

    def wait_served(self, n: int, timeout: float = 120) -> float:
        """Wait until ``n`` more requests have succeeded from now on: load really flowed, whatever its pace.

        The window is not reset. Stands where a test would otherwise sleep "long enough for some traffic".
        """
        with self._lock:
            target = self.counts.succeeded + n
        return wait_for(lambda: self.counts.succeeded >= target, timeout, f"{n} more requests served under load",
                        poll=0.2, state=lambda: f"window so far: {self.counts}")

    def _bump(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.counts, k, getattr(self.counts, k) + v)

    def one(self, i: int) -> int:
        """Send one request (with the client's 503 retries); return the final status (0: no answer)."""
        import openai

        self._bump(sent=1)
        for attempt in range(4):
            t0 = time.monotonic()
            try:
                self.client.chat.completions.create(
                    model=self.model, max_tokens=self.max_tokens,
                    messages=[{"role": "user", "content": f"the a of and to in is w{i % 400}"}])
                status = 200
            except openai.APIStatusError as exc:
                status = exc.status_code
                retry_after = exc.response.headers.get("retry-after")
                if status == 503:
                    reason = str(exc.message)[:100]
                    with self._lock:
                        self.counts.reasons_503[reason] = self.counts.reasons_503.get(reason, 0) + 1
            except openai.APITimeoutError:
                status = 0
                self._bump(timeouts=1)
            except openai.APIConnectionError as exc:
                status = -1
                with self._lock:
                    self.counts.errors[type(exc).__name__] = self.counts.errors.get(type(exc).__name__, 0) + 1
            latency = time.monotonic() - t0
            with self._lock:
                self.counts.max_latency_s = max(self.counts.max_latency_s, latency)
            if status == 200:
                self._bump(succeeded=1)
                self.events.append((time.time(), 200))
                return 200
            if status == 503:
                self._bump(status_503=1, status_503_with_retry_after=1 if retry_after else 0)
                if attempt < 3 and retry_after:
                    self._bump(retried=1)
                    time.sleep(min(float(retry_after), 2.0))
                    continue
            break
        self.events.append((time.time(), status))
        with self._lock:
            self.counts.failed += 1
            if status not in (0, -1):
                self.counts.errors[str(status)] = self.counts.errors.get(str(status), 0) + 1
        return status

    def _run(self, wid: int) -> None:
        i = wid
        while not self._stop.is_set():
            self.one(i)
            i += self.workers
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CLIENT_TIMEOUT_S * 5)


def add(*windows: Counts) -> Counts:
    """Counts of several windows together."""
    total = Counts()
    for w in windows:
        for k in ("sent", "succeeded", "retried", "failed", "status_503", "status_503_with_retry_after",
                  "timeouts"):
            setattr(total, k, getattr(total, k) + getattr(w, k))
        total.max_latency_s = max(total.max_latency_s, w.max_latency_s)
        for mine, theirs in ((total.errors, w.errors), (total.reasons_503, w.reasons_503)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
    return total


def ingress_counters(base_url: str) -> dict[str, int]:
    """The ingress's request counters (requests, retried, rejected, unavailable, timed_out) from /health."""
    return httpx.get(f"{base_url}/health", timeout=30).json().get("ingress", {})
