"""Serving commands: validate a deployment file, dry-run its build, serve it.

``fleetserve serve FILE`` is the documented way to serve: it resolves the file
where the user types the command (``${VAR}`` from this shell, ``--set``
overrides), which plain ``serve run`` cannot do because Serve builds the app
inside the cluster. Plain ``serve run FILE`` works for files with the values
written in. ``validate`` reports spec errors naming the file and key before
anything starts, and dry-runs the build to show each replica's placement.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster.commands import fail
from cluster.errors import FleetserveError
from cluster.fleet.state import state_file

console = Console()
err_console = Console(stderr=True)


SetOption = typer.Option(
    None, "--set", metavar="KEY=VALUE",
    help="Override a key of the deployment spec (dotted, YAML value; APP/KEY for one app), e.g. "
         "--set tensor_parallel_size=2 --set model.load_format=dummy. Repeatable.",
)


def validate(
    config: Path = typer.Argument(..., help="Ray Serve config file (deployments/*.yaml)."),
    build: bool = typer.Option(False, "--build", help="Also build the Serve app graph (no cluster needed)."),
    overrides: list[str] = SetOption,
    hostfile: Path = typer.Option(None, "--hostfile", help="Also check TP x PP against this hostfile's slots."),
) -> None:
    """Check a deployment file: every model spec, engine arg and placement."""
    from cluster.serving.app import engine_kwargs_for, llm_config_for
    from cluster.serving.config_file import load_serve_config

    try:
        cfg = load_serve_config(config, overrides)
        _check_models_here(cfg, config)
        if hostfile is not None:
            _check_hostfile_fits(cfg, config, hostfile)
    except FleetserveError as exc:
        fail(exc)
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
                f"{spec.tensor_parallel_size * spec.pipeline_parallel_size} x {pg['bundle_per_worker']} "
                f"{pg['strategy']}",
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
    overrides: list[str] = SetOption,
    address: str = typer.Option(
        None, help="Ray cluster (GCS) address; default: RAY_ADDRESS, else the cluster `fleetserve up` started, "
                   "else a local head started for this command."),
    detach: bool = typer.Option(False, "--detach", help="Deploy, wait until ready, and return (serve deploy)."),
    ready_timeout: float = typer.Option(3600, help="Seconds to wait for the endpoint to answer /health 200."),
    num_cpus: int = typer.Option(8, help="Logical CPUs for a local head (more than cores: Serve's ingress needs room)."),
) -> None:
    """Resolve the file here (${VAR} from this shell, --set), validate it, and serve it on the cluster.

    Serve builds a config file's apps inside the cluster, where this shell's
    environment is not seen; the file handed to Serve is therefore the resolved
    one (written next to the state file), so an override typed here is what the
    replicas get. Prints one line when the endpoint is ready; Ctrl-C stops the
    app, and the local Ray head if this command started it.
    """
    from cluster.commands.serve_launch import (SERVE_CLI, DeployFailed, DeployWatch, LocalHead, dashboard_answers,
                                               endpoint_url, recorded_cluster, wait_ready, write_resolved)
    from cluster.serving.config_file import load_serve_config

    recorded, auth_env, recorded_dashboard = recorded_cluster()
    address = address or os.environ.get("RAY_ADDRESS") or recorded
    if detach and not address:
        fail(FleetserveError("--detach needs a running cluster (fleetserve up, --address or RAY_ADDRESS): "
                             "a Ray head started by this command stops when it returns"))
    if address != recorded or "RAY_AUTH_MODE" in os.environ:
        auth_env = {}  # another cluster, or the user's own token settings: leave them as they are
    if address and address == recorded and recorded_dashboard and not dashboard_answers(recorded_dashboard):
        fail(FleetserveError(f"the cluster `fleetserve up` recorded ({address}) does not answer at "
                             f"{recorded_dashboard}\n  fix: bring it up again (fleetserve up HOSTFILE), name "
                             f"another with --address, or remove {state_file()} to serve on a Ray head of "
                             "this command's own"))
    try:
        cfg = load_serve_config(config, overrides)
        # Served on a head started here, the model must be on this machine.
        _check_models_here(cfg, config, require_local=not address)
    except FleetserveError as exc:
        fail(exc)
    head = None
    try:
        if not address:
            head = LocalHead(num_cpus, env=_head_env(cfg))
            console.print(f"starting a local Ray head ({num_cpus} logical CPUs) at {head.address}; it stops when "
                          "this command ends; `fleetserve status` shows it", soft_wrap=True)
            head.start()
            address = head.address
        env = dict(os.environ, RAY_ADDRESS=address, **auth_env)
        url = endpoint_url(cfg, address)
        if head:
            dashboard = head.dashboard_url
        elif address == recorded and recorded_dashboard:
            dashboard = recorded_dashboard
        else:
            dashboard = _dashboard_for(address)
        names = [app.get("name") or "default" for app in cfg["applications"]]  # Serve's name for an unnamed app
        watch = DeployWatch(dashboard if _is_host_port(address) else None, names, env)
        for name, app in zip(names, cfg["applications"]):
            if retry := watch.retry_env(name):
                app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(retry)
                err_console.print(f"[yellow]note:[/] application {escape(name)} had failed to deploy; Serve does not "
                                  "retry a failed app's unchanged config, so it is deployed afresh")
        resolved = write_resolved(cfg, config)
        if detach:
            subprocess.run([*SERVE_CLI, "deploy", str(resolved), "--address", dashboard], env=env, check=True)
            wait_ready(url, ready_timeout, None, watch)
            console.print(f"[green]ready[/]: {url}/v1 (OpenAI API), health {url}/health", soft_wrap=True)
            return
        # SIGINT at its default even when this command was started with it ignored (a background job):
        # it is how serve run is told to tear the app down.
        proc = subprocess.Popen([*SERVE_CLI, "run", str(resolved)], env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # A closed terminal or a `kill` ends it the way Ctrl-C does: app torn down, head stopped.
        # SIGINT too: a shell script's background job starts with SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        try:
            if wait_ready(url, ready_timeout, proc, watch):
                console.print(f"[green]ready[/]: {url}/v1 (OpenAI API), health {url}/health -- Ctrl-C stops it",
                              soft_wrap=True)
            proc.wait()
        except DeployFailed:
            # serve run would wait on a failed app forever. Killed, not interrupted: the app stays,
            # DEPLOY_FAILED with its reason, for `fleetserve status` and `serve status` (a local head
            # this command started goes with it below).
            proc.kill()
            proc.wait()
            raise
        except FleetserveError:
            # Not ready in time: serve run tears the app down (as on Ctrl-C), so nothing is left
            # deploying, holding GPUs, after this command has given up on it.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        except KeyboardInterrupt:
            if head is not None:
                # The app lives and dies with the head this command started: ending the head's
                # processes (below) ends the replicas and engines with it, without Serve's graceful
                # per-replica shutdown first (2 cores, tiny model: 42 s from SIGTERM to exit before, 13 s now).
                proc.kill()
                proc.wait()
            else:
                # From a terminal, serve run got the same SIGINT; from a signal to us alone, pass it on.
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=120)  # serve run deletes the app and waits for its replicas
                except subprocess.TimeoutExpired:
                    proc.kill()
        if proc.returncode not in (0, None, -2, 130):
            raise typer.Exit(proc.returncode)
    except subprocess.CalledProcessError as exc:
        raise typer.Exit(exc.returncode or 1) from None
    except FleetserveError as exc:
        fail(exc)
    finally:
        if head is not None:
            head.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _is_host_port(address: str) -> bool:
    """Whether ``address`` is a GCS ``host:port`` (not ``auto``, not a ``ray://`` client address)."""
    return re.fullmatch(r"[\w.\-]+:\d+", address or "") is not None


def _dashboard_for(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return f"http://{host}:8265"


def _check_hostfile_fits(cfg: dict, path: Path, hostfile: Path) -> None:
    """TP x PP of every model against the GPUs the hostfile lists (before `fleetserve up`)."""
    from cluster.errors import ConfigErrors
    from cluster.fleet.hostfile import load_hostfile
    from cluster.serving.spec import check_world_size

    slots = [h.slots for h in load_hostfile(hostfile).hosts]
    problems = []
    for prefix, spec in _specs_with_keys(cfg):
        problems += check_world_size(spec, slots, path, prefix, f"hostfile {hostfile}")
    if problems:
        raise ConfigErrors(problems)


def _head_env(cfg: dict) -> dict[str, str]:
    """Cluster settings a local head needs for the file's apps: the direct data path's HAProxy ingress."""
    from cluster.serving.haproxy import CLUSTER_ENV

    direct = any(serving.data_path == "direct" for serving in cfg.get("_fleetserve", {}).values())
    return dict(CLUSTER_ENV) if direct else {}


def _specs_with_keys(cfg: dict):
    """``(key prefix, spec)`` of every model of every fleetserve app in a loaded config."""
    for i, app in enumerate(cfg["applications"]):
        serving = cfg["_fleetserve"].get(app.get("name", f"app{i}"))
        for j, spec in enumerate(serving.models if serving else []):
            yield f"applications.{i}.args." + (f"models.{j}." if "models" in (app.get("args") or {}) else ""), spec


def _check_models_here(cfg: dict, path: Path, require_local: bool = False) -> None:
    """What can be checked where the command runs: TP/PP vs the model's heads, when its directory is here.

    A directory missing here is an error only with ``require_local``; on a
    cluster it may exist only on the GPU hosts, and each replica checks it there.
    """
    from cluster.errors import ConfigError, ConfigErrors
    from cluster.serving.modelcheck import parallelism_problems, read_config

    problems = []
    for prefix, spec in _specs_with_keys(cfg):
        model_config = read_config(spec.model.source)
        if model_config is None:
            where = "is not a directory with a config.json on this machine"
            if require_local:
                problems.append(ConfigError(path, prefix + "model.source", f"{spec.model.source!r} {where}",
                                            "make the model there (fleetserve make-model) or fix the path"))
            else:
                err_console.print(f"[yellow]note:[/] {escape(spec.model.source)} {where}; each replica "
                                  "checks it on its own host", highlight=False)
            continue
        for key, problem, fix in parallelism_problems(
                model_config, spec.tensor_parallel_size, spec.pipeline_parallel_size):
            problems.append(ConfigError(path, prefix + key, problem, fix))
    if problems:
        raise ConfigErrors(problems)


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(serve)
