"""The ``flaggems:`` block of a deployment spec.

One validated object holds what a deployment *asks* for from the FlagGems
(Triton) kernel switch: whether it is on, which vLLM ops are swapped, how CUDA
graphs / torch.compile run around them, whether a host that cannot run Triton
fails the deployment or falls back, and where the per-host tuning cache lives.
It travels to the replica as JSON in one env var (:data:`ENV_VAR`), where the
replica turns it into the plan its vLLM processes follow
(:func:`cluster.kernels.plan.plan_kernels`). Also here: the op table
(:data:`OPS`), the one list of ops every other list derives from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.errors import ConfigError, pydantic_errors

#: Env var with the *requested* ``flaggems:`` block (JSON), in the deployment's
#: runtime env. Only the replica reads it, to make the plan (:mod:`cluster.kernels.plan`).
ENV_VAR = "FLEETSERVE_FLAGGEMS"

OpKind = Literal["ir", "custom"]


@dataclass(frozen=True)
class KernelOp:
    """One op the plugin can swap. Its name is also vLLM's name for it.

    ``kind`` is how vLLM dispatches it: ``ir`` -- a vLLM IR op, selected through
    the engine's ``ir_op_priority``; ``custom`` -- a ``CustomOp``, which under
    torch.compile must be enabled by name (``compilation_config.custom_ops``).
    """

    kind: OpKind
    replaces: str


#: The op table: every op the plugin knows how to swap, how vLLM dispatches it
#: and what it replaces. Every other op list (IR ops, CustomOps, the op sets,
#: validation, the installers in ops.py, the docs' table) derives from or is
#: checked against this one.
OPS: dict[str, KernelOp] = {
    "rms_norm": KernelOp("ir", "vllm.ir.ops.rms_norm (RMSNorm without residual)"),
    "fused_add_rms_norm": KernelOp("ir", "vllm.ir.ops.fused_add_rms_norm (RMSNorm with residual add)"),
    "silu_and_mul": KernelOp("custom", "SiluAndMul.forward_cuda (SwiGLU activation of the MLP)"),
    "rotary_embedding": KernelOp("custom", "RotaryEmbedding.forward_cuda (neox/GPT-J RoPE, full rotary dim)"),
}


def ops_of_kind(kind: OpKind, ops: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The ops of ``kind`` (among ``ops``, all known ops if None), in table order."""
    return tuple(op for op, spec in OPS.items() if spec.kind == kind and (ops is None or op in ops))


#: The named op sets. "default" is the largest set that passed per-op parity and
#: the end-to-end logits check and met the throughput targets on the GPU
#: benchmarks (docs/flaggems.md, benchmarks/results/flaggems_gpu_results.json).
#: rotary_embedding passes parity but is left out: with it a standard-RoPE
#: model (Qwen2.5-7B) ran at 94.4% of stock throughput, under the 95% target.
OP_SETS: dict[str, tuple[str, ...]] = {
    "default": ("rms_norm", "fused_add_rms_norm", "silu_and_mul"),
    "norms": ("rms_norm", "fused_add_rms_norm"),
    "all": tuple(OPS),
}

GraphMode = Literal["compiled", "full_decode", "piecewise", "eager"]

#: What each graph mode means, for docs and error messages.
GRAPH_MODES: dict[str, str] = {
    "compiled": "torch.compile + full and piecewise CUDA graphs (vLLM's own default), "
    "FlagGems kernels kept as opaque custom ops",
    "full_decode": "no torch.compile, full CUDA graphs for decode batches, prefill eager",
    "piecewise": "torch.compile + piecewise CUDA graphs only",
    "eager": "no CUDA graphs, no torch.compile (enforce_eager)",
}


class FlagGemsConfig(BaseModel):
    """``flaggems:`` -- run chosen vLLM ops as FlagGems Triton kernels.

    ``ops`` is a named set (``default``, ``norms``, ``all``); ``include`` replaces
    it with an explicit list; ``exclude`` removes ops from whichever was chosen.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    ops: Literal["default", "norms", "all"] = "default"
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    record: bool = False
    graph_mode: GraphMode = "compiled"
    fallback_to_stock: bool = False
    tuning_cache_dir: str = "~/.cache/fleetserve/flaggems"

    @model_validator(mode="after")
    def _check_ops(self) -> FlagGemsConfig:
        for key, names in (("include", self.include or []), ("exclude", self.exclude)):
            unknown = [n for n in names if n not in OPS]
            if unknown:
                raise ValueError(
                    f"{key}: unknown op(s) {unknown}; known ops: {sorted(OPS)}"
                )
        if self.include is not None and not self.include:
            raise ValueError("include: empty list; omit it to use the named set in ops")
        if self.enabled and not self.selected_ops():
            raise ValueError("no op left after exclude; disable flaggems instead")
        return self

    def selected_ops(self) -> tuple[str, ...]:
        """The ops to patch, in a stable order."""
        base = self.include if self.include is not None else OP_SETS[self.ops]
        return tuple(op for op in OPS if op in base and op not in self.exclude)

    def to_env(self) -> str:
        return self.model_dump_json()


_FIXES = {
    "ops": f"use one of {sorted(OP_SETS)}, or list ops under include:",
    "graph_mode": f"use one of {sorted(GRAPH_MODES)}",
    "include": f"known ops: {sorted(OPS)}",
    "exclude": f"known ops: {sorted(OPS)}",
}


def parse_flaggems(data: Mapping[str, object] | None, source: str | None = None,
                   prefix: str = "flaggems.") -> FlagGemsConfig:
    """Validate a ``flaggems:`` mapping, raising ConfigErrors that name file and key."""
    try:
        return FlagGemsConfig.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise pydantic_errors(source, exc, prefix=prefix, fixes=_FIXES) from None


def config_from_env(environ: Mapping[str, str]) -> FlagGemsConfig | None:
    """The config this process was armed with, or None when the env var is unset."""
    raw = environ.get(ENV_VAR)
    if not raw:
        return None
    try:
        return FlagGemsConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"env {ENV_VAR}", None, f"not a valid flaggems config: {exc}",
                          "set it only through fleetserve (runtime_env_vars)") from None
