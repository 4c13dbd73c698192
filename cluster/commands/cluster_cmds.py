"""Cluster commands: ``up``, ``down``, ``status``, ``drain``, ``exec`` (hosts → SSH → Ray cluster)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from cluster.commands import fail
from cluster.errors import FleetserveError

if TYPE_CHECKING:
    from cluster.fleet.bringup import RayCluster
    from cluster.fleet.hostfile import ClusterConfig

HostfileArg = Annotated[Path, typer.Argument(help="Hostfile (FlagScale format, optional \\[cluster] section) or cluster YAML.")]
OptHostfileArg = Annotated[
    Optional[Path], typer.Argument(help="Hostfile; default: the one the last `fleetserve up` used.")
]


def open_cluster(config: ClusterConfig, **kwargs: Any) -> RayCluster:
    """The fleet layer's RayCluster as the CLI drives it: progress on the terminal, and on every node
    started, Serve's controller callback (replicas then migrate off nodes ``drain`` drains)."""
    from cluster.commands.progress import Progress
    from cluster.fleet.bringup import RayCluster
    from cluster.serving.drain import CONTROLLER_CALLBACK

    return RayCluster(config, node_env={"RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH": CONTROLLER_CALLBACK},
                      progress=Progress.factory(), **kwargs)


def cluster_status(rc: RayCluster) -> dict[str, Any]:
    """The fleet's status, plus Serve's applications and per-deployment summary as read on the head."""
    from cluster.serving.remote import serve_status

    st = rc.status()
    try:
        serve = rc.run_on_head(serve_status, {})
    except FleetserveError as exc:
        serve = {"serve_error": str(exc)}
    st.update({"serve": serve.get("serve") or {}, "serve_error": serve.get("serve_error"),
               "serve_summary": serve.get("serve_summary") or [],
               "serve_summary_error": serve.get("serve_summary_error")})
    return st


def up(
    hostfile: HostfileArg,
    trust_new_host_keys: Annotated[bool, typer.Option(
        "--trust-new-host-keys", help="Accept and record host keys missing from known_hosts (never changed ones).")] = False,
    timeout: Annotated[Optional[float], typer.Option(
        help="Seconds from the first ray start until every node joined; past it, what this run started is rolled "
             "back (default: ray.join_timeout).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Preflight every host, start Ray (head first, workers in parallel), wait until all joined."""
    from cluster.fleet.hostfile import load_hostfile

    try:
        config = load_hostfile(hostfile)
        with open_cluster(config, trust_new_host_keys=trust_new_host_keys) as rc:
            summary = rc.up(join_timeout=timeout)
    except FleetserveError as exc:
        fail(exc)
        return
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out = Console()
    started = summary["started"]
    verb = f"started Ray on {len(started)} host(s)" if started else "nothing to do: every host is already a node"
    out.print(f"cluster up at {summary['address']} ({verb}, {summary['seconds']:.1f}s)", highlight=False)
    if summary["dashboard"]:
        out.print(f"dashboard: {summary['dashboard']}", highlight=False)
    if config.settings.ray.auth == "token":
        out.print("Ray token authentication is on; for serve deploy/run, the dashboard and ray CLIs: "
                  "eval \"$(fleetserve token)\"", highlight=False)


def token(
    hostfile: OptHostfileArg = None,
    path: Annotated[bool, typer.Option("--path", help="Print only the token file's path.")] = False,
) -> None:
    """Print how to use the cluster's Ray token: an export line (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH).

    The token itself is never printed: Ray's clients (serve deploy, ray job submit,
    ray.init) read it from the file; a browser gets it from `cat` of that file.
    """
    import shlex

    from cluster.fleet.state import resolve_hostfile

    try:
        config = resolve_hostfile(hostfile)
        with open_cluster(config) as rc:
            token_file = rc.token_file
        if config.settings.ray.auth != "token":
            raise FleetserveError(f"cluster {config.settings.name!r} runs without Ray token authentication "
                                  "(ray.auth = disabled)")
        if not token_file.exists():
            raise FleetserveError(f"no token for this cluster at {token_file}\n  fix: fleetserve up first, or copy "
                                  "the head's token file there with mode 0600")
    except FleetserveError as exc:
        fail(exc)
        return
    if path:
        print(token_file)
    else:
        print(f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(token_file))}")


def down(hostfile: OptHostfileArg = None) -> None:
    """Stop Ray on every host of the hostfile (workers first, then the head)."""
    from cluster.fleet.state import resolve_hostfile

    try:
        config = resolve_hostfile(hostfile)
        with open_cluster(config) as rc:
            result = rc.down()
    except FleetserveError as exc:
        fail(exc)
        return
    bad = {h: r for h, r in result.items() if r != "stopped"}
    if bad:
        Console(stderr=True).print("[bold red]not every host was stopped:[/]\n" +
                                   "\n".join(f"  {h}: {r}" for h, r in bad.items()), highlight=False)
        raise typer.Exit(1)
    Console().print(f"cluster down ({len(result)} host(s))", highlight=False)


def status(
    hostfile: OptHostfileArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    address: Annotated[Optional[str], typer.Option(
        help="Look at a Ray cluster without a hostfile (e.g. the head `fleetserve serve` started here).")] = None,
) -> None:
    """Nodes, GPUs, health, Serve applications and the dashboard URL."""
    from cluster.commands.serve_launch import local_head_address
    from cluster.fleet.state import resolve_hostfile, state_file

    if address is None and hostfile is None and not state_file().exists():
        address = local_head_address()
    if address is not None:
        _status_at(address, as_json)
        return
    try:
        config = resolve_hostfile(hostfile)
        with open_cluster(config) as rc:
            st = cluster_status(rc)
    except FleetserveError as exc:
        fail(exc)
        return
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        out = Console()
        table = Table(title=f"Ray cluster {st['address']}")
        for col in ("host", "ip", "role", "state", "GPUs", "CPUs"):
            table.add_column(col)
        colors = {"alive": "green", "dead": "red", "duplicate": "red", "extra": "red"}
        for n in st["nodes"]:
            gpus = f"{n['gpus']:g}" + (f" / slots {n['slots']}" if n["slots"] is not None else "")
            state = n["state"] + (f" ({n['alive_nodes']} nodes)" if n["state"] == "duplicate" else "")
            table.add_row(n["host"], n["ip"], "head" if n["head"] else "worker",
                          f"[{colors.get(n['state'], 'red')}]{state}[/]", gpus, f"{n['cpus']:g}")
        out.print(table)
        why = [f"{label}: {', '.join(st[key])}" for key, label in
               (("missing", "never joined"), ("dead", "dead"), ("duplicate", "two or more raylets"),
                ("extra", "not in the hostfile")) if st[key]]
        health = "[green]healthy[/]" if st["healthy"] else "[red]unhealthy[/] (" + "; ".join(why) + "; fix: fleetserve up)"
        out.print(f"health: {health}; GPUs: {st['gpus_total']:g}", highlight=False)
        if st.get("auth") == "disabled":
            out.print("[bold red]Ray token authentication is OFF (ray.auth = disabled)[/]")
        out.print(f"dashboard: {st['dashboard'] or 'disabled'}", highlight=False)
        if st["serve"]:
            for app, info in st["serve"].items():
                deps = ", ".join(f"{d}={s}" for d, s in info["deployments"].items())
                out.print(f"serve app {app}: {info['status']} ({deps})", highlight=False)
            if st.get("serve_summary"):
                from cluster.serving.status import table_from_json

                out.print(table_from_json(st["serve_summary"]))
        else:
            out.print("serve: no applications" + (f" ({st['serve_error']})" if st.get("serve_error") else ""))
    if not st["healthy"]:
        raise typer.Exit(2)


def _status_at(address: str, as_json: bool) -> None:
    """Status of a cluster reached by address (no hostfile, no SSH): Ray's node table and Serve's summary."""
    import ray

    from cluster.serving.status import collect_serve_summary, table_from_json

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, namespace="fleetserve-admin")
    except Exception as exc:  # ray.init raises ConnectionError and others for a cluster that is gone
        fail(FleetserveError(f"no Ray cluster answers at {address}: {exc}"))
    try:
        nodes = [{"ip": n["NodeManagerAddress"], "alive": n["Alive"], "gpus": n["Resources"].get("GPU", 0),
                  "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes()]
        summary = collect_serve_summary()
    finally:
        ray.shutdown()
    healthy = all(n["alive"] for n in nodes)
    if as_json:
        print(json.dumps({"address": address, "nodes": nodes, "serve_summary": summary, "healthy": healthy}, indent=2))
    else:
        out = Console()
        table = Table(title=f"Ray cluster {address}")
        for col in ("ip", "state", "GPUs", "CPUs"):
            table.add_column(col)
        for n in nodes:
            table.add_row(n["ip"], "[green]alive[/]" if n["alive"] else "[red]dead[/]", f"{n['gpus']:g}",
                          f"{n['cpus']:g}")
        out.print(table)
        out.print(table_from_json(summary))
    if not healthy:
        raise typer.Exit(2)


def drain(
    host: Annotated[str, typer.Argument(help="The worker host to take out (as written in the hostfile).")],
    hostfile: OptHostfileArg = None,
    timeout: Annotated[float, typer.Option(help="Seconds Serve gets to move the replicas off the host.")] = 600.0,
    force: Annotated[bool, typer.Option(
        "--force", help="Also when a multi-node replica has workers there (its requests in flight fail).")] = False,
) -> None:
    """Move every Serve replica off HOST (replacements first, in-flight requests finish), then stop Ray there."""
    from cluster.fleet.state import resolve_hostfile
    from cluster.serving.remote import drain_wait

    try:
        config = resolve_hostfile(hostfile)
        with open_cluster(config) as rc:
            result = rc.drain(host, timeout=timeout, force=force, workload=drain_wait)
    except FleetserveError as exc:
        fail(exc)
        return
    Console().print(f"{result['host']} drained in {result['seconds']:.1f}s and Ray stopped there; remove it from "
                    "the hostfile (or run `fleetserve up` to bring it back)", highlight=False)


def exec_(
    hostfile: HostfileArg,
    command: Annotated[list[str], typer.Argument(help="Command to run on every host (after --).")],
    on_host: Annotated[bool, typer.Option("--on-host", help="Docker mode: run on the host, not in the Ray container.")] = False,
    host: Annotated[Optional[list[str]], typer.Option("--host", help="Only these hosts (repeatable).")] = None,
) -> None:
    """Run a command on every host in parallel; output lines are prefixed with the host."""
    import shlex

    from cluster.fleet.hostfile import load_hostfile

    lock = threading.Lock()

    def emit(name: str, stream: str, line: str) -> None:
        with lock:
            target = sys.stderr if stream == "stderr" else sys.stdout
            print(f"[{name}] {line}", file=target, flush=True)

    try:
        config = load_hostfile(hostfile)
        # Options after HOSTFILE arrive here (interspersed args are off, so the
        # command's own flags pass through untouched): take ours up to `--`.
        while command and command[0] in ("--host", "--on-host"):
            if command[0] == "--on-host":
                on_host, command = True, command[1:]
            elif len(command) > 1:
                host, command = [*(host or []), command[1]], command[2:]
            else:
                raise FleetserveError("--host needs a host name\n  fix: fleetserve exec HOSTFILE --host HOST -- CMD")
        if command and command[0] == "--":  # click keeps `--` when interspersed args are off
            command = command[1:]
        hosts = [config.host(h) for h in host] if host else None
        if not command:
            raise FleetserveError("no command given\n  fix: fleetserve exec HOSTFILE -- CMD")
        cmd = command[0] if len(command) == 1 else shlex.join(command)
        with open_cluster(config) as rc:
            results = rc.exec(cmd, emit, hosts=hosts, in_container=not on_host)
    except FleetserveError as exc:
        fail(exc)
        return
    failed = {h: r for h, r in results.items() if r != 0}
    for name, r in failed.items():
        print(f"[{name}] " + (f"exit status {r}" if isinstance(r, int) else f"error: {r}"), file=sys.stderr)
    if failed:
        raise typer.Exit(max((r for r in failed.values() if isinstance(r, int)), default=255))


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the top-level app."""
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
    app.command("drain")(drain)
    app.command("token")(token)
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)
