"""Serving commands: validate a deployment file, dry-run its build, serve it.

``serve run deployments/x.yaml`` is the primary way to serve (plain Ray Serve);
these commands add what Serve's CLI cannot: spec errors that name the file and
key before anything starts, a build dry run that shows each replica's
placement, and a ``serve`` wrapper that starts a local Ray head with enough
logical CPUs on small machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cluster.errors import FleetserveError

console = Console()
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def validate(
    config: Path = typer.Argument(..., help="Ray Serve config file (deployments/*.yaml)."),
    build: bool = typer.Option(False, "--build", help="Also build the Serve app graph (no cluster needed)."),
) -> None:
    """Check a deployment file: every model spec, engine arg and placement."""
    from cluster.serving.app import engine_kwargs_for, llm_config_for
    from cluster.spec import load_serve_config

    try:
        cfg = load_serve_config(config)
    except FleetserveError as exc:
        _fail(exc)
    table = Table(title=f"{config}")
    for col in ("app", "model", "source", "TP x PP", "bundles", "replicas", "flaggems"):
        table.add_column(col)
    for app_name, serving in cfg["_fleetserve"].items():
        for spec in serving.models:
            llm = llm_config_for(spec)
            pg = llm["placement_group_config"]
            table.add_row(
                app_name, spec.served_name, spec.model.source + (" (dummy)" if spec.model.load_format == "dummy" else ""),
                f"{spec.tensor_parallel_size} x {spec.pipeline_parallel_size}",
                f"{len(pg['bundles'])} x {pg['bundles'][0]} {pg['strategy']}",
                str(llm["deployment_config"].get("num_replicas") or llm["deployment_config"].get("autoscaling_config")),
                "on" if spec.flaggems.enabled else "off",
            )
            engine_kwargs_for(spec)
    console.print(table)
    if build:
        for app_name, serving in cfg["_fleetserve"].items():
            for line in build_dry_run(serving):
                console.print(f"  [{app_name}] {line}")
    console.print("[green]valid[/]")


def build_dry_run(serving) -> list[str]:
    """Build the Serve application graph exactly as ``serve run`` would, without deploying.

    ray.serve.llm reads the runtime context while it derives the replica options,
    which starts a local Ray instance when none is connected; that one is shut
    down again here, so a dry run leaves nothing running.
    """
    import ray
    from ray.serve._private.build_app import build_app as serve_build

    from cluster.serving.app import compose_app

    connected = ray.is_initialized()
    try:
        built = serve_build(compose_app(serving), name="dry-run")
    finally:
        if not connected and ray.is_initialized():
            ray.shutdown()
    lines = []
    for dep in built.deployments:
        opts = dep._deployment_config
        pg = dep._replica_config.placement_group_bundles
        lines.append(
            f"deployment {dep.name}: replicas={opts.num_replicas or opts.autoscaling_config}, "
            f"placement_group={pg} {dep._replica_config.placement_group_strategy or ''}"
        )
    return lines


def serve(
    config: Path = typer.Argument(..., help="Ray Serve config file (deployments/*.yaml)."),
    address: str = typer.Option(None, help="Ray address; default: RAY_ADDRESS, else a local head is started."),
    num_cpus: int = typer.Option(8, help="Logical CPUs for a local head (more than cores: Serve's ingress needs room)."),
) -> None:
    """Validate, make sure a Ray cluster is there, then `serve run` the file."""
    from cluster.spec import load_serve_config

    try:
        load_serve_config(config)
    except FleetserveError as exc:
        _fail(exc)
    env = dict(os.environ)
    address = address or env.get("RAY_ADDRESS")
    bindir = Path(sys.executable).parent
    if not address:
        status = subprocess.run([str(bindir / "ray"), "status"], capture_output=True, text=True)
        if status.returncode != 0:
            console.print(f"starting a local Ray head with {num_cpus} logical CPUs")
            subprocess.run(
                [str(bindir / "ray"), "start", "--head", f"--num-cpus={num_cpus}", "--disable-usage-stats"],
                check=True,
            )
        address = "auto"
    env["RAY_ADDRESS"] = address
    os.execve(str(bindir / "serve"), [str(bindir / "serve"), "run", str(config)], env)


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(serve)
