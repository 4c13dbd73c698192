"""The FlagGems decision of one replica: made once, followed by every vLLM process.

The replica (:class:`cluster.serving.engine.FleetLLMServer`) turns the
requested ``flaggems:`` block and the probe of its own host into one
:class:`KernelPlan` before its engine starts (:func:`plan_kernels`). From the
plan come

* the engine kwargs (:meth:`KernelPlan.engine_kwargs`), added once, at start;
* the env that carries the plan to every vLLM process of the replica
  (:meth:`KernelPlan.env`): the engine core inherits the replica's environment,
  and vLLM's Ray executor copies it to each TP/PP worker on every host -- the
  V2 executor copies the driver's whole environment, the V1 executor the names
  in ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY`` (vLLM's public setting for this,
  ``vllm/ray/ray_env.py``), which the plan's env extends;
* what the vLLM plugin (:mod:`cluster.kernels.plugin`) does in each process: it
  reads the plan (:func:`plan_from_env`) and follows it, checking no host itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.errors import ConfigError
from cluster.kernels.config import FlagGemsConfig, GraphMode, ops_of_kind
from cluster.kernels.host import FlagGemsUnavailable, HostSupport, probe_host

#: Env var with the replica's plan (JSON); read by the plugin in every vLLM process.
PLAN_ENV_VAR = "FLEETSERVE_FLAGGEMS_PLAN"
#: vLLM's list of extra env var names its V1 Ray executor copies to the workers.
VLLM_COPY_ENV_VAR = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"


class KernelPlan(BaseModel):
    """What every vLLM process of one replica does about FlagGems.

    ``mode``: ``off`` (not asked for), ``active`` (swap ``ops``) or ``fallback``
    (asked for, but the replica's host cannot run FlagGems and the spec allows
    stock kernels; ``reason`` says why). ``ops`` are the requested ops in every
    mode: swapped when active, reported as skipped in fallback, shown as stock
    in the metrics when off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str
    mode: Literal["off", "active", "fallback"]
    ops: tuple[str, ...] = ()
    graph_mode: GraphMode = "compiled"
    record: bool = False
    tuning_cache_dir: str = ""
    reason: str = ""

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM engine kwargs of this plan; empty when off.

        * the graph mode (kept in fallback: the user chose it);
        * active only: ``ir_op_priority`` puts the ``flaggems`` provider first
          for the IR ops (vLLM appends its platform defaults, which take over for
          arguments FlagGems does not support), and the CustomOps are enabled by
          name (``+op``): under torch.compile vLLM turns CustomOps off in favour
          of Inductor code, and the patched ``forward_cuda`` would never run.
        """
        if self.mode == "off":
            return {}
        active = self.mode == "active"
        out: dict[str, Any] = {}
        priority = {op: ["flaggems"] for op in ops_of_kind("ir", self.ops)} if active else {}
        if priority:
            out["ir_op_priority"] = priority
        custom_ops = [f"+{op}" for op in ops_of_kind("custom", self.ops)] if active else []
        compilation: dict[str, Any] = {}
        if self.graph_mode == "eager":
            out["enforce_eager"] = True
        elif self.graph_mode == "full_decode":
            # mode 0 = no torch.compile; CustomOps then use forward_cuda anyway.
            compilation = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
        elif self.graph_mode == "piecewise":
            compilation = {"cudagraph_mode": "PIECEWISE"}
        if custom_ops and self.graph_mode in ("compiled", "piecewise"):
            compilation["custom_ops"] = custom_ops
        if compilation:  # compiled without custom ops: vLLM's defaults
            out["compilation_config"] = compilation
        return out

    def env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Env vars to set in the replica (whose current env is ``environ``) so
        that every vLLM process it starts follows this plan; empty when off."""
        if self.mode == "off":
            return {}
        copied = [n.strip() for n in environ.get(VLLM_COPY_ENV_VAR, "").split(",") if n.strip()]
        if PLAN_ENV_VAR not in copied:
            copied.append(PLAN_ENV_VAR)
        return {PLAN_ENV_VAR: self.model_dump_json(), VLLM_COPY_ENV_VAR: ",".join(copied)}


def plan_kernels(cfg: FlagGemsConfig, deployment: str,
                 probe: Callable[[], HostSupport] = probe_host) -> KernelPlan:
    """The replica's plan from the requested ``cfg`` and the probe of this host.

    Raises :class:`FlagGemsUnavailable` (Serve marks the deployment failed with
    its message) when FlagGems is asked for, this host cannot run it and
    ``fallback_to_stock`` is false.
    """
    common = dict(deployment=deployment, ops=cfg.selected_ops(), graph_mode=cfg.graph_mode,
                  record=cfg.record, tuning_cache_dir=cfg.tuning_cache_dir)
    if not cfg.enabled:
        return KernelPlan(mode="off", **common)
    support = probe()
    if support.ok:
        return KernelPlan(mode="active", reason=support.details, **common)
    if not cfg.fallback_to_stock:
        raise FlagGemsUnavailable(
            f"flaggems.enabled is true but this host cannot run FlagGems: {support.reason}. "
            "Fix: run this deployment on GPU hosts with triton and flag-gems installed, "
            "set flaggems.enabled: false, or set flaggems.fallback_to_stock: true to serve "
            "with vLLM's stock kernels instead."
        )
    return KernelPlan(mode="fallback",
                      reason=f"{support.reason}; serving with vLLM's stock kernels (fallback_to_stock: true)",
                      **common)


def plan_from_env(environ: Mapping[str, str]) -> KernelPlan | None:
    """The plan this process was given, or None when none was (FlagGems off)."""
    raw = environ.get(PLAN_ENV_VAR)
    if not raw:
        return None
    try:
        return KernelPlan.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"env {PLAN_ENV_VAR}", None, f"not a valid FlagGems plan: {exc}",
                          "leave it to fleetserve: the replica sets it (cluster.kernels.plan)") from None
