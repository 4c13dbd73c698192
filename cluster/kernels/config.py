"""The ``flaggems:`` block of a deployment spec.

One validated object decides everything about the FlagGems (Triton) kernel
switch of one deployment: whether it is on, which vLLM ops are swapped, how
CUDA graphs / torch.compile run around them, whether a host that cannot run
Triton fails the deployment or falls back, and where the per-host tuning
cache lives. It travels to the vLLM processes as JSON in one env var
(:data:`ENV_VAR`), so it is also parsed back from there (:func:`config_from_env`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.errors import ConfigError, pydantic_errors

#: Env var that arms the vLLM general plugin in one deployment's processes.
ENV_VAR = "FLEETSERVE_FLAGGEMS"
#: Deployment name the plugin puts into its reports.
DEPLOYMENT_ENV_VAR = "FLEETSERVE_FLAGGEMS_DEPLOYMENT"
#: FlagGems' own cache dir variable (tuned configs + generated code).
FLAGGEMS_CACHE_ENV_VAR = "FLAGGEMS_CACHE_DIR"

#: Every op the plugin knows how to swap, with what it replaces in vLLM.
KNOWN_OPS: dict[str, str] = {
    "rms_norm": "vllm.ir.ops.rms_norm (RMSNorm without residual)",
    "fused_add_rms_norm": "vllm.ir.ops.fused_add_rms_norm (RMSNorm with residual add)",
    "silu_and_mul": "SiluAndMul.forward_cuda (SwiGLU activation of the MLP)",
    "rotary_embedding": "RotaryEmbedding.forward_cuda (neox/GPT-J RoPE, full rotary dim)",
}

#: The named op sets. "default" is the largest set that passed per-op parity and
#: the end-to-end logits check and met the throughput targets on the GPU
#: benchmarks (docs/flaggems.md, benchmarks/results/flaggems_gpu_results.json).
#: rotary_embedding passes parity but is left out: with it a standard-RoPE
#: model (Qwen2.5-7B) ran at 94.4% of stock throughput, under the 95% target.
OP_SETS: dict[str, tuple[str, ...]] = {
    "default": ("rms_norm", "fused_add_rms_norm", "silu_and_mul"),
    "norms": ("rms_norm", "fused_add_rms_norm"),
    "all": tuple(KNOWN_OPS),
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
            unknown = [n for n in names if n not in KNOWN_OPS]
            if unknown:
                raise ValueError(
                    f"{key}: unknown op(s) {unknown}; known ops: {sorted(KNOWN_OPS)}"
                )
        if self.include is not None and not self.include:
            raise ValueError("include: empty list; omit it to use the named set in ops")
        if self.enabled and not self.selected_ops():
            raise ValueError("no op left after exclude; disable flaggems instead")
        return self

    def selected_ops(self) -> tuple[str, ...]:
        """The ops to patch, in a stable order."""
        base = self.include if self.include is not None else OP_SETS[self.ops]
        return tuple(op for op in KNOWN_OPS if op in base and op not in self.exclude)

    def to_env(self) -> str:
        return self.model_dump_json()


_FIXES = {
    "ops": f"use one of {sorted(OP_SETS)}, or list ops under include:",
    "graph_mode": f"use one of {sorted(GRAPH_MODES)}",
    "include": f"known ops: {sorted(KNOWN_OPS)}",
    "exclude": f"known ops: {sorted(KNOWN_OPS)}",
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
