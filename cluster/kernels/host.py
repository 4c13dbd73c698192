"""Can this host run FlagGems? Checked on the replica before the engine starts.

The deep check (``import flag_gems`` and resolving each kernel) initialises
CUDA, so it runs in a short-lived subprocess: the replica process that hosts
vLLM's API/engine must not hold a CUDA context of its own.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass

from cluster.errors import FleetserveError
from cluster.kernels.config import FlagGemsConfig


class FlagGemsUnavailable(FleetserveError):
    """flaggems.enabled on a host that cannot run FlagGems' Triton kernels."""


@dataclass(frozen=True)
class HostSupport:
    ok: bool
    reason: str = ""
    details: str = ""


_PROBE = r"""
import json, sys
out = {}
try:
    import torch
    out["cuda"] = torch.cuda.is_available()
    out["device"] = torch.cuda.get_device_name(0) if out["cuda"] else ""
    if out["cuda"]:
        from cluster.kernels.ops import _flag_gems_kernels
        _flag_gems_kernels()
        import flag_gems
        out["flag_gems"] = flag_gems.__version__
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def probe_host(deep: bool = True, timeout: float = 180.0) -> HostSupport:
    """Why this host cannot run FlagGems, or ok."""
    try:
        import torch
    except ImportError:
        return HostSupport(False, "torch is not installed")
    if not torch.cuda.is_available():
        return HostSupport(False, "no CUDA GPU is visible on this host (FlagGems kernels are Triton GPU kernels)")
    for mod, pkg in (("triton", "triton"), ("flag_gems", "flag-gems")):
        if importlib.util.find_spec(mod) is None:
            return HostSupport(False, f"Python package {pkg} is not installed")
    if not deep:
        return HostSupport(True)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return HostSupport(False, f"FlagGems probe did not finish: {exc}")
    if "error" in result:
        return HostSupport(False, f"FlagGems cannot load its kernels: {result['error']}")
    return HostSupport(True, details=f"{result.get('device')} flag_gems {result.get('flag_gems')}")


def check_host_support(cfg: FlagGemsConfig, *, deep: bool = True) -> HostSupport:
    """Fail clearly if ``cfg`` asks for FlagGems on a host that cannot run it.

    Returns the probe result; raises :class:`FlagGemsUnavailable` when FlagGems is
    enabled, the host cannot run it and ``fallback_to_stock`` is false. With
    ``fallback_to_stock`` the deployment starts on vLLM's stock kernels and the
    workers' reports say ``fallback`` with the reason.
    """
    if not cfg.enabled:
        return HostSupport(True, "flaggems disabled")
    support = probe_host(deep=deep)
    if not support.ok and not cfg.fallback_to_stock:
        raise FlagGemsUnavailable(
            f"flaggems.enabled is true but this host cannot run FlagGems: {support.reason}. "
            "Fix: run this deployment on GPU hosts with triton and flag-gems installed, "
            "set flaggems.enabled: false, or set flaggems.fallback_to_stock: true to serve "
            "with vLLM's stock kernels instead."
        )
    return support
