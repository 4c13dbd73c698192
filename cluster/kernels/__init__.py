"""FlagGems (Triton) kernel switch, per deployment.

The ``flaggems:`` block of a deployment spec (:class:`FlagGemsConfig`) becomes

* env vars for that deployment's runtime env (:func:`runtime_env_vars`), which
  arm the vLLM general plugin (:mod:`cluster.kernels.plugin`) in every process
  of that deployment and no other;
* vLLM engine kwargs (:func:`engine_overrides`): the graph mode, the IR op
  priorities that select the FlagGems kernels, the CustomOps to enable;
* a host check on the replica (:func:`check_host_support`);
* per-process reports (:func:`collect_reports`) for the health endpoint.

Heavy imports (torch, vllm, flag_gems) happen only inside the functions that
need them, so the spec and CLI stay fast to import.
"""

from __future__ import annotations

from typing import Any

from cluster.kernels.config import (
    DEPLOYMENT_ENV_VAR,
    ENV_VAR,
    FLAGGEMS_CACHE_ENV_VAR,
    GRAPH_MODES,
    KNOWN_OPS,
    OP_SETS,
    FlagGemsConfig,
    config_from_env,
    parse_flaggems,
)
from cluster.kernels.host import FlagGemsUnavailable, HostSupport, check_host_support, probe_host
from cluster.kernels.report import collect_reports, report_dir

__all__ = [
    "DEPLOYMENT_ENV_VAR", "ENV_VAR", "GRAPH_MODES", "KNOWN_OPS", "OP_SETS",
    "FlagGemsConfig", "FlagGemsUnavailable", "HostSupport", "check_host_support", "collect_reports",
    "config_from_env", "engine_overrides", "parse_flaggems", "probe_host", "report_dir", "runtime_env_vars",
]

# Kept in sync with cluster.kernels.ops (not imported here: it needs torch).
_IR_OPS = ("rms_norm", "fused_add_rms_norm")
_CUSTOM_OPS = ("silu_and_mul", "rotary_embedding")


def runtime_env_vars(cfg: FlagGemsConfig, deployment_name: str) -> dict[str, str]:
    """Env vars for one deployment's runtime env; empty when FlagGems is off."""
    if not cfg.enabled:
        return {}
    # FLAGGEMS_CACHE_DIR is set by the plugin on each host (tuning_cache_dir with
    # that host's ~ expanded): FlagGems does not expand ~ itself.
    return {ENV_VAR: cfg.to_env(), DEPLOYMENT_ENV_VAR: deployment_name}


def engine_overrides(cfg: FlagGemsConfig) -> dict[str, Any]:
    """vLLM engine kwargs the FlagGems mode needs; empty when FlagGems is off.

    * IR ops (rms_norm, fused_add_rms_norm): ``ir_op_priority`` puts the
      ``flaggems`` provider first; vLLM appends its platform defaults, which
      take over for arguments FlagGems does not support.
    * CustomOps (silu_and_mul, rotary_embedding): under torch.compile vLLM
      turns CustomOps off in favour of Inductor code, so they are enabled
      by name (``+op``) to reach the patched ``forward_cuda``.
    """
    if not cfg.enabled:
        return {}
    ops = cfg.selected_ops()
    out: dict[str, Any] = {}
    priority = {op: ["flaggems"] for op in _IR_OPS if op in ops}
    if priority:
        out["ir_op_priority"] = priority
    custom_ops = [f"+{op}" for op in _CUSTOM_OPS if op in ops]
    if cfg.graph_mode == "eager":
        out["enforce_eager"] = True
    elif cfg.graph_mode == "full_decode":
        # mode 0 = no torch.compile; CustomOps then use forward_cuda anyway.
        out["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    elif cfg.graph_mode == "piecewise":
        out["compilation_config"] = {"cudagraph_mode": "PIECEWISE", "custom_ops": custom_ops}
    else:  # compiled: vLLM's defaults (compile + FULL_AND_PIECEWISE) with our ops opaque
        out["compilation_config"] = {"custom_ops": custom_ops}
    return out
