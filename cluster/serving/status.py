"""Terminal summary of the Serve applications on a Ray cluster (for ``fleetserve status``).

Two sources, both already maintained by Ray, so nothing here keeps state:

* Serve's instance details -- the same document the Ray dashboard's Serve page
  and ``GET /api/serve/applications/`` show: each deployment's status, target
  replica count, and each replica's state and node. Read from the dashboard's
  REST API when its URL is given (no Ray connection needed), else from the
  Serve controller through the connected driver.
* Each node's Prometheus endpoint (``ray.nodes()`` lists the ports): ongoing
  requests per replica (Serve's ``ray_serve_replica_processing_queries``) and
  vLLM's running/waiting/KV-cache gauges joined through the replica id. One
  GET per node with a short timeout; an unreachable node just leaves "-".

Ray's own ``serve status`` prints the YAML of statuses, not replicas per node
or load, which is what an operator watching a scale-out needs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

#: Ray dashboard route with Serve's instance details (ServeInstanceDetails schema).
DASHBOARD_SERVE_ROUTE = "/api/serve/applications/"


@dataclass
class ReplicaLoad:
    """What the metrics endpoints say about one replica right now."""

    ongoing: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_cache: float | None = None


@dataclass
class DeploymentSummary:
    app: str
    deployment: str
    status: str
    target: int
    states: dict[str, int]
    #: node IP -> replicas there that are not stopping
    nodes: dict[str, int]
    autoscaling: str
    message: str = ""
    replicas: list[dict[str, Any]] = field(default_factory=list)
    ongoing: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_cache: float | None = None

    @property
    def running_replicas(self) -> int:
        return self.states.get("RUNNING", 0)


def ray_auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's Ray token (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) as an HTTP header.

    Read from ``environ`` (default: this process's environment) on every call: Ray 2.58's
    own loader keeps the first token a process saw, which is the wrong one after talking
    to another cluster.
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE") != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN")
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    if not token and path.is_file():  # Ray's own default place when neither is set
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def fetch_serve_details(dashboard_url: str | None = None, timeout: float = 10.0,
                        environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Serve's instance details: from the dashboard if ``dashboard_url`` (with the Ray token ``environ``
    names), else from the controller."""
    if dashboard_url:
        r = httpx.get(dashboard_url.rstrip("/") + DASHBOARD_SERVE_ROUTE, timeout=timeout,
                      headers=ray_auth_headers(environ))
        r.raise_for_status()
        return r.json()
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return {"applications": {}}  # Serve is not running on this cluster
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=timeout)
    # The controller's dict holds str-Enums (DeploymentStatus.HEALTHY); JSON gives the
    # plain values, exactly what the dashboard's REST route returns.
    return json.loads(json.dumps(details, default=str))


def metrics_endpoints() -> list[str]:
    """``http://ip:port/metrics`` of every alive node (needs a Ray connection)."""
    import ray

    out = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            out.append(f"http://{node['NodeManagerAddress']}:{port}/metrics")
    return out


def scrape_replica_load(endpoints: list[str], timeout: float = 3.0) -> dict[str, ReplicaLoad]:
    """Per replica id: ongoing requests (Serve) and vLLM's running/waiting/KV-cache gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    loads: dict[str, ReplicaLoad] = collections.defaultdict(ReplicaLoad)
    wanted = {
        "ray_serve_replica_processing_queries": "ongoing",
        "ray_vllm_num_requests_running": "running",
        "ray_vllm_num_requests_waiting": "waiting",
        "ray_vllm_kv_cache_usage_perc": "kv_cache",
    }
    for url in endpoints:
        try:
            text = httpx.get(url, timeout=timeout).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            attr = wanted.get(family.name)
            if attr is None:
                continue
            for sample in family.samples:
                # Serve labels the replica by its unique id; vLLM by ReplicaId (same id).
                rid = sample.labels.get("replica") or sample.labels.get("ReplicaId")
                if not rid:
                    continue
                load = loads[rid]
                previous = getattr(load, attr)
                # Counts add up over a replica's engines (data parallel); KV-cache use is a
                # fraction per engine: keep the fullest.
                if previous is None:
                    setattr(load, attr, sample.value)
                else:
                    setattr(load, attr, max(previous, sample.value) if attr == "kv_cache" else previous + sample.value)
    return dict(loads)


def summarize(details: dict[str, Any], loads: dict[str, ReplicaLoad] | None = None) -> list[DeploymentSummary]:
    """One row per deployment of every application in Serve's instance details."""
    loads = loads or {}
    rows = []
    for app_name, app in sorted((details.get("applications") or {}).items()):
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            replicas = dep.get("replicas") or []
            states = collections.Counter(str(r.get("state")) for r in replicas)
            # Where the live replicas are: a STOPPING one is on its way out (and after a lost
            # host it has no node left to name); the states column still counts it.
            nodes = collections.Counter(r.get("node_ip") or "?" for r in replicas
                                        if r.get("state") != "STOPPING")
            cfg = dep.get("deployment_config") or {}
            auto = cfg.get("autoscaling_config")
            autoscaling = (f"{auto.get('min_replicas')}..{auto.get('max_replicas')} "
                           f"@{auto.get('target_ongoing_requests')}") if auto else "fixed"
            row = DeploymentSummary(
                app=app_name, deployment=dep_name, status=str(dep.get("status")),
                target=int(dep.get("target_num_replicas") or 0), states=dict(states), nodes=dict(nodes),
                autoscaling=autoscaling, message=str(dep.get("message") or ""), replicas=replicas,
            )
            for attr in ("ongoing", "running", "waiting", "kv_cache"):
                vals = [getattr(loads[r["replica_id"]], attr) for r in replicas if r.get("replica_id") in loads]
                vals = [v for v in vals if v is not None]
                if vals:
                    # KV-cache use is a fraction per replica: show the fullest one.
                    setattr(row, attr, max(vals) if attr == "kv_cache" else sum(vals))
            rows.append(row)
    return rows


def failure_reason(message: str) -> str:
    """The one line of a Serve deployment message that says why (its exception), without the traceback."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "Traceback", "The above exception", "During handling")):
            return line[:400]
    return ""


def _num(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.0f}%" if pct else f"{value:g}"


def serve_table(rows: list[DeploymentSummary]) -> Table:
    """The rich table ``fleetserve status`` prints under the cluster's nodes."""
    table = Table(title="Serve deployments")
    for col in ("app", "deployment", "status", "replicas", "states", "nodes", "autoscaling",
                "ongoing", "running", "waiting", "KV cache"):
        table.add_column(col, overflow="fold")
    for r in rows:
        colour = {"HEALTHY": "green", "UPDATING": "yellow", "UPSCALING": "yellow", "DOWNSCALING": "yellow"}.get(
            r.status, "red")
        table.add_row(
            r.app, r.deployment, f"[{colour}]{r.status}[/]", f"{r.running_replicas}/{r.target}",
            " ".join(f"{k}={v}" for k, v in sorted(r.states.items())) or "-",
            " ".join(f"{k}:{v}" for k, v in sorted(r.nodes.items())) or "-",
            r.autoscaling, _num(r.ongoing), _num(r.running), _num(r.waiting), _num(r.kv_cache, pct=True),
        )
    if not rows:
        table.caption = "no Serve applications are running"
    else:
        failing = [f"{r.deployment}: {failure_reason(r.message)}" for r in rows
                   if r.message and r.status != "HEALTHY"]
        if failing:
            table.caption = "\n".join(failing)[:2000]
    return table


def collect_serve_summary(dashboard_url: str | None = None, with_load: bool = True) -> list[dict[str, Any]]:
    """The summary as JSON-able dicts: run it where Ray is reachable (e.g. on the head over SSH)."""
    import ray

    details = fetch_serve_details(dashboard_url)
    loads = scrape_replica_load(metrics_endpoints()) if with_load and ray.is_initialized() else {}
    return [dataclasses.asdict(row) for row in summarize(details, loads)]


def table_from_json(rows: list[dict[str, Any]]) -> Table:
    """Render :func:`collect_serve_summary`'s output (e.g. after it came back over SSH)."""
    return serve_table([DeploymentSummary(**row) for row in rows])
