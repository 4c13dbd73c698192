"""Model commands: ``make-model`` writes a model directory without downloads."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def make_model(
    arch: str = typer.Option(..., "--arch", help="Architecture: qwen2_5_vl | minicpm_o_26."),
    size: str = typer.Option(
        ..., "--size",
        help="qwen2_5_vl: tiny (random weights, CPU) | 7b | 32b; minicpm_o_26: tiny | 8b. "
             "Sizes other than tiny write no weights: serve them with load_format: dummy.",
    ),
    out: Path = typer.Option(..., "--out", help="Directory to write (created if missing)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights (tiny)."),
) -> None:
    """Write config, tokenizer, processor config (and tiny random weights) for an architecture. No downloads."""
    from cluster.commands import fail
    from cluster.modelgen import ModelGenError
    from cluster.modelgen import make_model as _make

    try:
        path = _make(arch, size, out, seed=seed)
    except ModelGenError as exc:
        fail(exc)
    files = sorted(p.name for p in path.iterdir())
    console.print(f"[green]wrote[/] {path}: {', '.join(files)}")


def register(app: typer.Typer) -> None:
    app.command("make-model")(make_model)
