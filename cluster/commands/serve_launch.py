"""What ``fleetserve serve`` needs around ``serve run``: the resolved file, a cluster, a ready line.

* The resolved config goes to a file Serve can read: the app is built inside
  the cluster from that file's values, not from this shell's environment.
* The cluster: the one named, else the one ``fleetserve up`` recorded, else a
  local head owned by this command. ``ray start --head --block`` runs in a
  session of its own: Ctrl-C in the terminal reaches ``serve run`` (which tears
  the app down) but not Ray's dashboard and GCS, and every process Ray starts
  for this head (GCS, raylet, dashboard, workers, vLLM engines) stays in that
  session. Stopping the head ends exactly that session's processes -- never
  ``ray stop``, which ends every Ray on the machine, other users' too, and not
  a signal to ``ray start --block`` alone, which (Ray 2.58) leaves the GCS
  running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.errors import FleetserveError
from cluster.fleet.state import state_file

#: Seconds between /health probes while waiting for the endpoint.
READY_POLL_S = 2.0
#: Ray's and Serve's CLIs run as modules of this interpreter: the same Ray as ours,
#: also where no console scripts are installed (a stack on PYTHONPATH).
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
SERVE_CLI = [sys.executable, "-m", "ray.serve.scripts"]


def write_resolved(cfg: dict[str, Any], source: Path) -> Path:
    """Write the resolved config (without fleetserve's validation objects) where Serve can read it."""
    out_dir = Path(os.environ.get("FLEETSERVE_STATE_DIR", Path.home() / ".local/state/fleetserve")) / "served"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in cfg.items() if k != "_fleetserve"}
    path = out_dir / f"{source.stem}.resolved.yaml"
    # Values may come from the environment (paths, switches): readable by this user only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"# resolved by `fleetserve serve` from {source.resolve()}\n")
        yaml.safe_dump(data, fh, sort_keys=False)
    return path


def recorded_cluster() -> tuple[str | None, dict[str, str], str | None]:
    """The GCS address the last `fleetserve up` recorded, the env that presents its Ray token, its dashboard."""
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None, {}, None
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"]} if state.get("token_path") else {}
    return state.get("address"), auth, state.get("dashboard")


def dashboard_answers(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a Ray dashboard answers at ``url`` (an auth refusal is an answer too).

    Ray's own connect to a GCS that is gone retries for ~20 s and ends in a
    traceback; this lets the caller say which cluster it meant, and the fix.
    """
    try:
        return httpx.get(f"{url}/api/version", timeout=timeout_s).status_code in (200, 401, 403)
    except httpx.HTTPError:
        return False


def endpoint_url(cfg: dict[str, Any], address: str) -> str:
    """Where the config's HTTP proxy (on the head: ``proxy_location: HeadOnly``) is reached from here."""
    http = cfg.get("http_options") or {}
    host = str(http.get("host") or "127.0.0.1")
    head = address.rsplit(":", 1)[0] if address and address != "auto" else "127.0.0.1"
    if host in ("0.0.0.0", "::", "") or host in ("127.0.0.1", "localhost"):
        host = head
    return f"http://{host}:{int(http.get('port') or 8000)}"


class DeployFailed(FleetserveError):
    """Serve (or the endpoint's ``/health``) says the deployment failed; the message is its reason."""


class DeployWatch:
    """Serve's own verdict on the apps this command deploys: the reason when one failed.

    ``/health`` cannot give it in every case: an app whose build failed has no
    endpoint at all, and on the direct data path HAProxy answers 503 without a
    reason while no replica runs. Serve's application details (the dashboard's
    REST route, as ``serve status`` reads them) have the status and message in
    every case. An app counts only once its deploy time differs from what it was
    before this command deployed (Serve stamps every deploy, changed or not).

    An app that existed before is *replaced*: Serve rolls it, and the version
    being replaced answers ``/health`` (200, or ``failed`` with its old reason)
    until the new one runs. So while :meth:`check` names a replaced app whose
    new version Serve has not brought up (RUNNING or UNHEALTHY after the new
    stamp), ``/health`` does not speak for this deploy. A new app has nothing
    older to answer for it. Serve does not retry an app it marked DEPLOY_FAILED
    when the same config comes again (Ray 2.58: same code version, nothing to
    update), so :meth:`retry_env` names the apps that need a fresh attempt. Where
    Serve's details cannot be read before the deploy, or stop being readable for
    :data:`UNREAD_POLLS` polls in a row, the watch stays out (``/health`` alone
    decides, as before).
    """

    #: Polls in a row with Serve's details unreadable before the watch gives the decision to /health.
    UNREAD_POLLS = 5

    def __init__(self, dashboard_url: str | None, apps: list[str], environ: dict[str, str]):
        self.dashboard_url, self.apps, self.environ = dashboard_url, apps, environ
        before = self._applications() if dashboard_url else None
        self._before = None if before is None else {name: app.get("last_deployed_time_s") for name, app in before.items()}
        self.failed_before = sorted(n for n, app in (before or {}).items() if app.get("status") == "DEPLOY_FAILED")
        self._unread = 0

    def _applications(self) -> dict[str, Any] | None:
        from cluster.serving.status import fetch_serve_details

        try:
            details = fetch_serve_details(self.dashboard_url, timeout=2, environ=self.environ)
        except (httpx.HTTPError, ValueError, OSError):
            return None  # not up, or a moment's failure: /health and the next poll go on
        return {name: app for name, app in (details.get("applications") or {}).items() if name in self.apps}

    def retry_env(self, name: str) -> dict[str, str]:
        """Env for app ``name``'s ``runtime_env`` that makes Serve attempt it afresh if it had failed, else {}.

        A changed ``runtime_env`` is a new code version to Serve: the app is built and its
        replicas started again. Only a failed app gets it; a running one is left as it runs.
        """
        return {"FLEETSERVE_DEPLOY_ATTEMPT": f"{time.time():.0f}"} if name in self.failed_before else {}

    @property
    def active(self) -> bool:
        """Whether Serve's details were read before the deploy, so that this deploy's can be told apart."""
        return self._before is not None

    def check(self) -> tuple[str | None, str | None]:
        """One read of Serve's details: (the replaced apps whose new version Serve has not brought up,
        ``op: DEPLOYING``; ``app: reason`` of every app of this deploy Serve marked DEPLOY_FAILED), None for nothing."""
        if not self.active:
            return None, None
        apps = self._applications()
        self._unread = 0 if apps is not None else self._unread + 1
        if apps is None:
            if self._unread >= self.UNREAD_POLLS:
                self._before = None  # for good: /health alone decides from here
                return None, None
            return ("Serve's application details unread" if self._before else None), None
        return self._pending(apps), self._failure(apps)

    def _pending(self, apps: dict[str, Any]) -> str | None:
        waiting = []
        for name, stamp in self._before.items():
            app = apps.get(name) or {}
            if app.get("last_deployed_time_s") == stamp:
                waiting.append(f"{name}: not deployed yet")
            elif app.get("status") not in ("RUNNING", "UNHEALTHY"):
                waiting.append(f"{name}: {app.get('status')}")
        return ", ".join(waiting) or None

    def _failure(self, apps: dict[str, Any]) -> str | None:
        reasons = []
        for name, app in apps.items():
            if app.get("last_deployed_time_s") == self._before.get(name) or app.get("status") != "DEPLOY_FAILED":
                continue
            messages = [app.get("message") or ""] + [d.get("message") or "" for d in (app.get("deployments") or {}).values()
                                                     if d.get("status") == "DEPLOY_FAILED"]
            reasons.append(f"application {name}: " + " | ".join(_without_tracebacks(m) for m in messages if m.strip()))
        return "; ".join(reasons) or None


#: A line that starts an exception's text: ``cluster.errors.ConfigError: ...``, ``RuntimeError: ...``.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b[^:]*:")


def _without_tracebacks(message: str) -> str:
    """Serve's message without Python's traceback: its first line and the last exception's text (file, key, fix).

    Serve nests tracebacks (a build task's ``RayTaskError(RuntimeError)`` holding the
    builder's own, which starts mid-line): what the user acts on is the innermost, last
    exception and the lines after it.
    """
    lines = message.strip().splitlines()
    if "Traceback (most recent call last)" not in message:
        return "\n".join(lines)
    last = max((i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)), default=None)
    if last is None:
        return lines[0]
    return "\n".join(([lines[0]] if last > 0 and not _EXCEPTION_LINE.match(lines[0]) else []) + lines[last:])


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None,
               watch: DeployWatch | None = None) -> bool:
    """Wait until ``url``/health answers 200 for this deploy; False when ``proc`` (serve run) ended first.

    A deployment that failed ends the wait with its reason instead of waiting out
    the timeout: Serve's DEPLOY_FAILED after this deploy's stamp (``watch``), or
    ``/health`` saying ``failed``. While ``watch`` has a replaced app pending, the
    version being replaced may be what answers ``/health``: neither its 200 nor
    its ``failed`` counts for this deploy then.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        pending, verdict = watch.check() if watch is not None else (None, None)
        if verdict:
            raise DeployFailed("deployment failed: " + verdict)
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                if not pending:
                    return True
                last = f"200, but Serve has not run this deploy yet: {pending}"
            else:
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                failed = {m: s.get("reason") for m, s in (body.get("models") or {}).items()
                          if s.get("state") == "failed"}
                if failed and not pending:
                    raise DeployFailed("deployment failed: " + "; ".join(f"{m}: {why}" for m, why in failed.items()))
                last = f"{r.status_code} {body.get('status', '')}" + (f"; Serve: {pending}" if pending else "")
        except (httpx.HTTPError, ValueError) as exc:
            last = type(exc).__name__
        time.sleep(READY_POLL_S)
    raise FleetserveError(f"{url}/health did not answer 200 within {timeout_s:g}s (last: {last})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A single-node Ray head owned by one ``fleetserve serve`` command (see module docstring)."""

    def __init__(self, num_cpus: int, env: dict[str, str] | None = None):
        self.env = dict(env or {})  # cluster settings for every Ray process of this head
        self.port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # A temp dir of its own: Ray records "the current cluster" there, so other Ray programs on the
        # machine never attach to this head by default, and nothing of it is left in /tmp/ray after stop.
        self.temp_dir = Path(tempfile.gettempdir()) / f"fleetserve-head-{self.port}"
        self._cmd = [
            *RAY_CLI, "start", "--head", "--block", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
        ]
        self._proc: subprocess.Popen | None = None

    @property
    def record(self) -> Path:
        """Where ``fleetserve status`` finds this head (beside the state file of `fleetserve up`)."""
        return state_file().parent / "local-head.json"

    def start(self, timeout_s: float = 120.0) -> None:
        # vLLM's INFO lines (per process: Triton probing, every engine option) bury what a user watching
        # this terminal needs; its warnings and errors stay. VLLM_LOGGING_LEVEL=INFO brings them back.
        env = {"VLLM_LOGGING_LEVEL": "WARNING", **self.env, **os.environ}  # what the user set wins
        self._proc = subprocess.Popen(self._cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise FleetserveError(f"ray start failed: {(self._proc.stderr.read() or '')[-2000:]}")
            try:
                # The dashboard answers last: then GCS, raylet and the job/serve APIs are up.
                if httpx.get(f"{self.dashboard_url}/api/version", timeout=2).status_code == 200:
                    self.record.parent.mkdir(parents=True, exist_ok=True)
                    self.record.write_text(json.dumps({"address": self.address, "pid": self._proc.pid}))
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise FleetserveError(f"the local Ray head did not come up within {timeout_s:g}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """End every process of this head's session: SIGTERM, then SIGKILL what is left.

        vLLM's processes and the raylet end on SIGTERM within seconds; the GCS, the
        Serve controller, proxy and ingress actors outlive it by 30 s and more (Ray
        2.58, seen on CPU), so the grace before SIGKILL is short.
        """
        if self._proc is None:
            return
        sid = self._proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_pids(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout_s
            while session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not session_pids(sid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self._proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.record.unlink(missing_ok=True)


def local_head_address() -> str | None:
    """The address of the head a running ``fleetserve serve`` started on this machine, if any."""
    try:
        head = json.loads((state_file().parent / "local-head.json").read_text())
        os.kill(int(head["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return head["address"]


def session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) of session ``sid``, from /proc (Linux, as Ray's nodes are)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                # pid (comm) state ppid pgrp session ...: comm may hold spaces, so split after ')'.
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids
