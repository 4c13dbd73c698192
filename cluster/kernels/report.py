"""Per-process FlagGems reports: written by the plugin, read by /health.

Every vLLM process the plugin armed (API/engine process and each GPU worker)
writes one JSON report: which ops it patched, skipped (why) or failed, whether
the FlagGems kernels loaded, and -- with ``record: true`` -- which ops ran.

Two places, because workers of one deployment can sit on several hosts:

* a file per process under ``report_dir(deployment)`` on the worker's host
  (survives nothing: it describes live processes; stale files of dead local
  processes are ignored), and
* Ray's internal KV store, when the process is connected to Ray (vLLM's Ray
  workers are), so the replica can read the reports of workers on other hosts.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

REPORT_DIR_ENV_VAR = "FLEETSERVE_FLAGGEMS_REPORT_DIR"
_KV_NAMESPACE = "fleetserve_flaggems"


def report_dir(deployment: str) -> Path:
    base = os.environ.get(REPORT_DIR_ENV_VAR) or os.path.join(tempfile.gettempdir(), "fleetserve-flaggems")
    return Path(base) / (deployment or "_")


def _key(report: dict[str, Any]) -> str:
    return f"{report['deployment']}/{report['hostname']}/{report['pid']}"


def publish(report: dict[str, Any]) -> Path:
    """Write ``report`` to its file (atomically) and, if connected, to Ray's KV."""
    report["updated"] = time.time()
    path = report_dir(report["deployment"]) / f"{report['hostname']}-{report['pid']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True))
    os.replace(tmp, path)
    try:
        import ray

        if ray.is_initialized():
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(_key(report).encode(), json.dumps(report).encode(),
                                         overwrite=True, namespace=_KV_NAMESPACE)
    except Exception:  # the file is the primary record; the KV is a convenience
        pass
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_reports(deployment: str, *, include_stale: bool = False) -> dict[str, Any]:
    """All reports of one deployment's processes, plus a summary.

    Reads Ray's KV (all hosts) when this process is connected to Ray, and the
    local report files. Reports of local processes that have exited are dropped
    unless ``include_stale``. Returns ``{"deployment", "processes": [...],
    "summary": {"processes", "triton_ops", "failed", "status"}}``.
    """
    found: dict[str, dict[str, Any]] = {}
    try:
        import ray

        if ray.is_initialized():
            from ray.experimental import internal_kv

            for key in internal_kv._internal_kv_list(f"{deployment}/".encode(), namespace=_KV_NAMESPACE):
                raw = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
                if raw:
                    found[key.decode()] = json.loads(raw)
    except Exception:
        pass
    directory = report_dir(deployment)
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            try:
                rep = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found[_key(rep)] = rep
    host = socket.gethostname()
    processes = [r for r in found.values()
                 if include_stale or r.get("hostname") != host or _alive(int(r.get("pid", 0)))]
    processes.sort(key=lambda r: (r.get("hostname", ""), r.get("pid", 0)))
    triton_ops = sorted({op for r in processes for op, res in r.get("ops", {}).items()
                         if res.get("status") == "patched" and r.get("status") == "active"})
    failed = sorted({f"{op}: {res.get('reason', '')}" for r in processes
                     for op, res in r.get("ops", {}).items() if res.get("status") == "failed"})
    statuses = {r.get("status") for r in processes}
    status = ("none" if not processes else "failed" if "failed" in statuses
              else "fallback" if "fallback" in statuses else "active")
    return {
        "deployment": deployment,
        "processes": processes,
        "summary": {"processes": len(processes), "triton_ops": triton_ops, "failed": failed, "status": status},
    }
