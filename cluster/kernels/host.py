"""Can this host run FlagGems? The only host check: the replica runs it once,
before its engine starts, and its plan (:mod:`cluster.kernels.plan`) carries
the answer to every vLLM process.

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


class FlagGemsUnavailable(FleetserveError):
    """flaggems.enabled on a host that cannot run FlagGems' Triton kernels."""


@dataclass(frozen=True)
class HostSupport:
    """The probe's answer: ``reason`` says why not, ``details`` what was found."""

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
