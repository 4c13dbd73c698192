"""The vLLM ops that can run as FlagGems Triton kernels, and how each is swapped.

Each op has two sides that must both be right before it is swapped:

* the **vLLM target** -- a vLLM IR op (``vllm.ir.ops.rms_norm``, where vLLM
  itself picks an implementation by priority) or a ``CustomOp.forward_cuda``
  method. The target must exist and its parameters must be the ones the
  replacement was written for; otherwise the op is *skipped* with the reason,
  so a vLLM upgrade degrades to stock kernels instead of crashing.
* the **FlagGems kernel** -- a function of ``flag_gems`` with the parameters
  we call it with. ``import flag_gems`` initialises CUDA and takes seconds, so
  it happens on the first real call (in the GPU worker, during vLLM's profile
  run, before any CUDA graph is captured), never in the API process.

The FlagGems calls are wrapped in ``torch.library`` custom ops
(``fleetserve_gems::*``) with fake implementations: torch.compile and vLLM's
IR lowering then see one opaque node per call (they cannot trace Triton
launches), and CUDA graphs capture the Triton kernels like any other.

vLLM's IR registry and ``CustomOp`` dispatch are the supported extension
points; what is written by hand here is only the glue between vLLM's calling
conventions and FlagGems', which no library provides.
"""

import functools
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("fleetserve.flaggems")

PROVIDER = "flaggems"
LIB = "fleetserve_gems"


@dataclass
class OpResult:
    """What happened to one op in one process."""

    status: str  # patched | skipped | failed
    reason: str = ""
    target: str = ""
    kernel: str = ""
    calls: int = 0


@dataclass
class KernelState:
    """Per-process record of FlagGems kernel loading and (optionally) calls."""

    record: bool = False
    loaded: bool | None = None  # None: not tried yet
    load_error: str = ""
    calls: dict[str, int] = field(default_factory=dict)
    on_change: "Callable[[], None] | None" = None
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = KernelState()

# FlagGems entry points we call, with the leading parameters we pass.
KERNELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rms_norm": ("flag_gems.ops.rms_norm", "rms_norm_forward", ("x", "normalized_shape", "weight", "eps")),
    "fused_add_rms_norm": ("flag_gems.fused.fused_add_rms_norm", "fused_add_rms_norm",
                           ("x", "residual", "normalized_shape", "weight", "eps")),
    "silu_and_mul": ("flag_gems.fused.silu_and_mul", "silu_and_mul_out", ("A", "B", "out")),
    "rotary_embedding": ("flag_gems.fused.rotary_embedding", "apply_rotary_pos_emb",
                         ("q", "k", "cos", "sin", "position_ids", "rotary_interleaved", "inplace")),
}


def params_match(fn: Callable[..., Any], expected: tuple[str, ...]) -> str | None:
    """None if ``fn`` takes ``expected`` as its leading parameters, else why not."""
    try:
        names = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as exc:
        return f"cannot read signature: {exc}"
    if names[: len(expected)] != expected:
        return f"signature {names} does not start with {expected}"
    return None


@functools.cache
def _flag_gems_kernels() -> dict[str, Callable[..., Any]]:
    """Import FlagGems once per process and resolve every kernel we call."""
    import importlib

    out: dict[str, Callable[..., Any]] = {}
    for op, (module, name, expected) in KERNELS.items():
        fn = getattr(importlib.import_module(module), name, None)
        if fn is None:
            raise RuntimeError(f"flag_gems has no {module}.{name} (needed for {op})")
        why = params_match(fn, expected)
        if why:
            raise RuntimeError(f"flag_gems {module}.{name}: {why}")
        out[op] = fn
    return out


def kernel(op: str) -> Callable[..., Any]:
    """The FlagGems function for ``op``; loads FlagGems on first use."""
    if STATE.loaded is None:
        with STATE.lock:
            if STATE.loaded is None:
                try:
                    _flag_gems_kernels()
                    STATE.loaded = True
                except Exception as exc:  # reported, then re-raised with context
                    STATE.loaded = False
                    STATE.load_error = f"{type(exc).__name__}: {exc}"
                if STATE.on_change:
                    STATE.on_change()
    if not STATE.loaded:
        raise RuntimeError(
            f"fleetserve flaggems: FlagGems kernels could not be loaded in this worker "
            f"({STATE.load_error}); install flag-gems on every GPU host or disable flaggems "
            f"for this deployment"
        )
    return _flag_gems_kernels()[op]


def _count(op: str) -> None:
    if STATE.record:
        first = op not in STATE.calls
        STATE.calls[op] = STATE.calls.get(op, 0) + 1
        if first:
            logger.info("fleetserve flaggems: first call of %s (Triton)", op)
            if STATE.on_change:
                STATE.on_change()


@functools.cache
def define_custom_ops() -> None:
    """Define the ``fleetserve_gems::*`` torch ops (once per process)."""
    import torch
    from torch import Tensor

    @torch.library.custom_op(f"{LIB}::rms_norm", mutates_args=())
    def rms_norm(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
        _count("rms_norm")
        y, _ = kernel("rms_norm")(x, [x.shape[-1]], weight, epsilon)
        return y

    @rms_norm.register_fake
    def _(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
        return torch.empty_like(x)

    @torch.library.custom_op(f"{LIB}::fused_add_rms_norm", mutates_args=("x", "residual"))
    def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, epsilon: float) -> None:
        # In place, like vLLM's own kernel: x <- norm(x + residual), residual <- x + residual.
        _count("fused_add_rms_norm")
        kernel("fused_add_rms_norm")(x, residual, [x.shape[-1]], weight, epsilon)

    @fused_add_rms_norm.register_fake
    def _(x: Tensor, residual: Tensor, weight: Tensor, epsilon: float) -> None:
        return None

    @torch.library.custom_op(f"{LIB}::silu_and_mul", mutates_args=())
    def silu_and_mul(x: Tensor) -> Tensor:
        _count("silu_and_mul")
        d = x.shape[-1] // 2
        out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
        kernel("silu_and_mul")(x[..., :d], x[..., d:], out)
        return out

    @silu_and_mul.register_fake
    def _(x: Tensor) -> Tensor:
        d = x.shape[-1] // 2
        return x.new_empty(x.shape[:-1] + (d,))

    @torch.library.custom_op(f"{LIB}::rotary_embedding", mutates_args=("query", "key"))
    def rotary_embedding(positions: Tensor, query: Tensor, key: Tensor, head_size: int,
                         cos_sin_cache: Tensor) -> None:
        # Neox style, rotary_dim == head_size (checked before dispatching here).
        _count("rotary_embedding")
        n = positions.numel()
        half = cos_sin_cache.shape[-1] // 2
        kernel("rotary_embedding")(
            query.view(n, -1, head_size), key.view(n, -1, head_size),
            cos_sin_cache[:, :half], cos_sin_cache[:, half:], positions.view(-1),
            rotary_interleaved=False, inplace=True,
        )

    @rotary_embedding.register_fake
    def _(positions: Tensor, query: Tensor, key: Tensor, head_size: int, cos_sin_cache: Tensor) -> None:
        return None


# ----------------------------------------------------------------------------------
# Installing each op into vLLM. Each installer returns an OpResult and never raises.
# ----------------------------------------------------------------------------------

def _install_ir_rms_norm() -> OpResult:
    import torch
    from vllm import ir
    from torch import Tensor

    op = getattr(ir.ops, "rms_norm", None)
    target = "vllm.ir.ops.rms_norm"
    if op is None:
        return OpResult("skipped", "vLLM has no IR op rms_norm", target)
    why = params_match(op.impls["native"].impl_fn, ("x", "weight", "epsilon", "variance_size"))
    if why:
        return OpResult("skipped", f"IR op changed: {why}", target)
    if PROVIDER in op.impls:
        return OpResult("patched", "already registered in this process", target, "flag_gems rms_norm_forward")

    def supports(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> bool:
        return (weight is not None and variance_size is None and x.is_cuda
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32))

    def impl(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
        return torch.ops.fleetserve_gems.rms_norm(x, weight, epsilon)

    op.register_impl(PROVIDER, supports_args=supports, supported=torch.cuda.is_available())(impl)
    return OpResult("patched", "", target, "flag_gems.ops.rms_norm.rms_norm_forward")


def _install_ir_fused_add_rms_norm() -> OpResult:
    import torch
    from vllm import ir
    from torch import Tensor

    op = getattr(ir.ops, "fused_add_rms_norm", None)
    target = "vllm.ir.ops.fused_add_rms_norm"
    if op is None:
        return OpResult("skipped", "vLLM has no IR op fused_add_rms_norm", target)
    why = params_match(op.impls["native"].impl_fn, ("x", "x_residual", "weight", "epsilon", "variance_size"))
    if why:
        return OpResult("skipped", f"IR op changed: {why}", target)
    if PROVIDER in op.impls:
        return OpResult("patched", "already registered in this process", target, "flag_gems fused_add_rms_norm")

    def supports(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
                 variance_size: int | None = None) -> bool:
        # FlagGems' kernel works in place on contiguous rows only.
        return (weight is not None and variance_size is None and x.is_cuda
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and x.is_contiguous() and x_residual.is_contiguous() and x.dtype == x_residual.dtype)

    def impl(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
             variance_size: int | None = None) -> tuple[Tensor, Tensor]:
        torch.ops.fleetserve_gems.fused_add_rms_norm(x, x_residual, weight, epsilon)
        return x, x_residual

    op.register_impl(PROVIDER, supports_args=supports, supported=torch.cuda.is_available(),
                     inplace=True)(impl)
    return OpResult("patched", "", target, "flag_gems.fused.fused_add_rms_norm")


def _patch_method(cls: type, name: str, expected: tuple[str, ...], make: Callable[[Callable[..., Any]], Callable[..., Any]],
                  target: str, kernel_name: str) -> OpResult:
    orig = cls.__dict__.get(name)
    if orig is None:
        return OpResult("skipped", f"{cls.__name__} defines no {name}", target)
    if getattr(orig, "__fleetserve_flaggems__", False):
        return OpResult("patched", "already patched in this process", target, kernel_name)
    why = params_match(orig, expected)
    if why:
        return OpResult("skipped", f"method changed: {why}", target)
    new = make(orig)
    functools.update_wrapper(new, orig)
    new.__fleetserve_flaggems__ = True  # type: ignore[attr-defined]
    new.__wrapped_stock__ = orig  # type: ignore[attr-defined]
    setattr(cls, name, new)
    return OpResult("patched", "", target, kernel_name)


def _install_silu_and_mul() -> OpResult:
    import torch
    from vllm.model_executor.layers.activation import SiluAndMul

    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        def forward_cuda(self: Any, x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                return orig(self, x)
            return torch.ops.fleetserve_gems.silu_and_mul(x)
        return forward_cuda

    return _patch_method(SiluAndMul, "forward_cuda", ("self", "x"), make,
                         "vllm...activation.SiluAndMul.forward_cuda", "flag_gems.fused.silu_and_mul_out")


def _install_rotary_embedding() -> OpResult:
    import torch
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        def forward_cuda(self: Any, positions: torch.Tensor, query: torch.Tensor,
                         key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
            # Only the common case FlagGems implements: neox style, full rotary dim,
            # q and k present; anything else keeps vLLM's kernel.
            if (key is None or not self.is_neox_style or self.rotary_dim != self.head_size
                    or getattr(self, "use_flashinfer", False) or positions.dim() != 1):
                return orig(self, positions, query, key)
            cos_sin_cache = self._match_cos_sin_cache_dtype(query)
            torch.ops.fleetserve_gems.rotary_embedding(positions, query, key, self.head_size, cos_sin_cache)
            return query, key
        return forward_cuda

    return _patch_method(RotaryEmbedding, "forward_cuda", ("self", "positions", "query", "key"), make,
                         "vllm...rotary_embedding.base.RotaryEmbedding.forward_cuda",
                         "flag_gems.fused.apply_rotary_pos_emb")


#: One installer per op of the op table (cluster.kernels.config.OPS; a test checks they match).
INSTALLERS: dict[str, Callable[[], OpResult]] = {
    "rms_norm": _install_ir_rms_norm,
    "fused_add_rms_norm": _install_ir_fused_add_rms_norm,
    "silu_and_mul": _install_silu_and_mul,
    "rotary_embedding": _install_rotary_embedding,
}



def install(ops: tuple[str, ...]) -> dict[str, OpResult]:
    """Swap ``ops`` into vLLM in this process; every op gets a result, none raises.

    IR ops get a ``flaggems`` provider in every process (the engine config's
    ``ir_op_priority`` names it, and vLLM validates that wherever it builds the
    config); it is marked supported only where CUDA is (the GPU workers).
    """
    define_custom_ops()
    results: dict[str, OpResult] = {}
    for name in ops:
        try:
            results[name] = INSTALLERS[name]()
        except Exception as exc:  # a broken op must not take the others down
            logger.exception("fleetserve flaggems: installing %s failed", name)
            results[name] = OpResult("failed", f"{type(exc).__name__}: {exc}")
    return results
