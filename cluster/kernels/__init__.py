"""FlagGems (Triton) kernel switch, per deployment.

The ``flaggems:`` block of a deployment spec (:class:`FlagGemsConfig`) is what
a deployment *asks* for. The app builder puts it into the deployment's runtime
env (:func:`runtime_env_vars`); each replica, on its own host and before its
engine starts, turns it into one :class:`KernelPlan` (:func:`plan_kernels`:
active, fallback or a clear error) -- the engine kwargs and the env that
carries the plan to every vLLM process come from that plan, and the vLLM
general plugin (:mod:`cluster.kernels.plugin`) follows it in each process and
writes per-process reports (:func:`collect_reports`) for the health endpoint.

Every op list derives from one table, :data:`OPS`.

Heavy imports (torch, vllm, flag_gems) happen only inside the functions that
need them, so the spec and CLI stay fast to import.
"""

from __future__ import annotations

from cluster.kernels.config import (
    ENV_VAR,
    GRAPH_MODES,
    OP_SETS,
    OPS,
    FlagGemsConfig,
    KernelOp,
    config_from_env,
    ops_of_kind,
    parse_flaggems,
)
from cluster.kernels.host import FlagGemsUnavailable, HostSupport, probe_host
from cluster.kernels.plan import PLAN_ENV_VAR, KernelPlan, plan_from_env, plan_kernels
from cluster.kernels.report import collect_reports, report_dir

__all__ = [
    "ENV_VAR", "GRAPH_MODES", "OPS", "OP_SETS", "PLAN_ENV_VAR",
    "FlagGemsConfig", "FlagGemsUnavailable", "HostSupport", "KernelOp", "KernelPlan", "collect_reports",
    "config_from_env", "ops_of_kind", "parse_flaggems", "plan_from_env", "plan_kernels", "probe_host",
    "report_dir", "runtime_env_vars",
]


def runtime_env_vars(cfg: FlagGemsConfig) -> dict[str, str]:
    """Env vars for one deployment's runtime env: the requested config, for its
    replicas to plan from; empty when FlagGems is off."""
    if not cfg.enabled:
        return {}
    return {ENV_VAR: cfg.to_env()}
