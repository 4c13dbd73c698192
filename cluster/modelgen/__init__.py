"""``fleetserve make-model``: model directories made locally, without downloads.

No model hub is reachable from the machines this runs on, yet vLLM needs a
real model directory: config.json of the architecture, a tokenizer whose
special tokens sit at the ids the architecture expects, the processor config,
and (unless ``load_format: dummy``) weights. Hugging Face's tooling only
*downloads* these, so each architecture module here builds them:

* ``qwen2_5_vl``: sizes tiny (random weights, CPU), 7b, 32b (config only);
* ``minicpm_o_26``: sizes tiny (random weights, CPU), 8b (config only), with
  configuration/processing/tokenization modules of our own (trust_remote_code).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cluster.modelgen import minicpmo, qwen2_5_vl


# arch -> (sizes, writer(size, out, seed))
ARCHS: dict[str, tuple[tuple[str, ...], Callable[[str, Path, int], Path]]] = {
    "qwen2_5_vl": (tuple(qwen2_5_vl.SIZES), qwen2_5_vl.make),
    "minicpm_o_26": (tuple(minicpmo.SIZES), minicpmo.make),
}


class ModelGenError(ValueError):
    """Unknown architecture/size or an unusable output directory."""


def make_model(arch: str, size: str, out: str | Path, seed: int = 0) -> Path:
    """Write a model directory for ``arch``/``size`` into ``out`` (created if missing) and return it."""
    if arch not in ARCHS:
        raise ModelGenError(f"unknown --arch {arch!r}; choose one of {sorted(ARCHS)}")
    sizes, writer = ARCHS[arch]
    if size not in sizes:
        raise ModelGenError(f"unknown --size {size!r} for {arch}; choose one of {list(sizes)}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelGenError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return writer(size, out, seed)


__all__ = ["ARCHS", "ModelGenError", "make_model"]
