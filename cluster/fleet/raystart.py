"""The shell commands that host Ray on a node: env file, ``docker run``, ``ray start``, ``ray stop``.

Pure builders (strings from the hostfile's settings); :mod:`cluster.fleet.bringup`
runs them over SSH.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping

from cluster.fleet.hostfile import ClusterConfig, Host
from cluster.fleet.preflight import Probe

NODE_LABEL = "fleetserve.io/host"
#: Ray's message when a new node misses its fixed 30 s to register with the GCS.
TRANSIENT_START_ERROR = "The current node timed out during startup"


def label_value(text: str) -> str:
    """Ray label values follow Kubernetes' rules (alphanumerics, '-', '_', '.')."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")
    return value or "host"


def node_env(config: ClusterConfig, host: Host, probe: Probe, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray (and so for vLLM's workers) on ``host``: config env + NCCL/Gloo interface + ``extra``.

    ``extra`` is what the layer above needs on every node (e.g. Serve's controller
    callback); the hostfile's ``env.*`` wins over it.
    """
    env = dict(config.settings.env)
    if probe.iface:
        env.setdefault("NCCL_SOCKET_IFNAME", probe.iface)
        env.setdefault("GLOO_SOCKET_IFNAME", probe.iface)
    env.setdefault("VLLM_HOST_IP", host.ray_ip)
    for key, value in (extra or {}).items():
        env.setdefault(key, value)
    return env


class NodeCommands:
    """Command builders for the nodes of one hostfile's cluster."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.ray = config.settings.ray
        self.docker = config.settings.docker

    @property
    def head(self) -> Host:
        return self.config.head

    @property
    def address(self) -> str:
        return f"{self.head.ray_ip}:{self.ray.port}"

    def python(self) -> str:
        return self.docker.python if self.docker else self.ray.python

    def ray_cli(self) -> str:
        return self.docker.ray if self.docker else self.ray.ray

    def in_node(self, command: str) -> str:
        """A command run where Ray runs, with the node's environment (auth token path, env.*).

        Natively the node's env file is sourced first; in docker mode the
        container already has that environment (``docker run -e``).
        """
        if self.docker:
            return f"docker exec -i {self.docker.name} sh -c {shlex.quote(command)}"
        env_file = self.secret_path("env")
        return f"if [ -r {env_file} ]; then . {env_file}; fi; {command}"

    def secret_path(self, kind: str) -> str:
        """Shell word for this cluster's ``token``/``env``/``pid`` file on a host (``~`` expands there)."""
        base = self.ray.secrets_dir.rstrip("/") or "/"
        leaf = f"{label_value(self.config.settings.name)}.{kind}" if kind else ""
        path = f"{base}/{leaf}" if leaf else base
        if path == "~" or path.startswith("~/"):
            return '"$HOME"' + (shlex.quote(path[1:]) if path[1:] else "")
        return shlex.quote(path)

    def start_pidfile(self) -> str | None:
        """The pid file of a native ``ray start`` as the probe reads it (``~`` expanded there); None in docker."""
        if self.docker:
            return None
        return self.ray.secrets_dir.rstrip("/") + f"/{label_value(self.config.settings.name)}.pid"

    def env_file_text(self, env: Mapping[str, str]) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        if self.ray.auth == "token":
            lines += ["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN_PATH={self.secret_path('token')}"]
        return "\n".join(lines) + "\n"

    def put_secret_command(self, kind: str) -> str:
        """Write one file of the secrets dir with mode 0600, its content from stdin (never argv)."""
        path, folder = self.secret_path(kind), self.secret_path("")
        return (f"umask 077 && mkdir -p {folder} && chmod 700 {folder} && cat > {path}.tmp && chmod 600 {path}.tmp "
                f"&& mv -f {path}.tmp {path}")

    def docker_run_command(self, host: Host, env: Mapping[str, str]) -> str:
        """The ``docker run`` that hosts Ray on ``host`` (the seeds' flags; image from config)."""
        d = self.docker
        assert d is not None
        args = ["docker", "run", "-d", "--init", "--name", d.name, "--net=host", "--ipc=host",
                f"--shm-size={d.shm_size}", "--label", f"{NODE_LABEL}={label_value(host.name)}"]
        if d.gpus:
            args.append(f"--gpus={d.gpus}")
        if d.privileged:
            args.append("--privileged")
        for volume in d.volumes:
            args += ["-v", volume]
        for k in env:  # names only: docker takes the values from the sourced env file, not argv
            args += ["-e", k]
        if self.ray.auth == "token":
            args += ["-e", "RAY_AUTH_MODE", "-e", "RAY_AUTH_TOKEN_PATH"]
        args += list(d.run_args)
        args += [d.image, "sleep", "infinity"]
        cmd = " ".join(shlex.quote(a) for a in args)
        if self.ray.auth == "token":
            cmd = cmd.replace(" -e RAY_AUTH_TOKEN_PATH ",
                              ' -e RAY_AUTH_TOKEN_PATH -v "$RAY_AUTH_TOKEN_PATH:$RAY_AUTH_TOKEN_PATH:ro" ', 1)
        return f". {self.secret_path('env')} && {cmd}"

    def ray_start_command(self, host: Host) -> str:
        r = self.ray
        is_head = host is self.head
        labels = f"{NODE_LABEL}={label_value(host.name)}"
        if host.gpu_type:
            labels += f",fleetserve.io/gpu-type={label_value(host.gpu_type)}"
        args = [self.ray_cli(), "start", f"--node-ip-address={host.ray_ip}", f"--num-gpus={host.slots}",
                f"--temp-dir={r.temp_dir}", f"--labels={labels}", "--disable-usage-stats"]
        if is_head:
            args += ["--head", f"--port={r.port}", f"--ray-client-server-port={r.client_server_port}",
                     f"--include-dashboard={'true' if r.dashboard else 'false'}"]
            if r.dashboard:
                args += [f"--dashboard-host={r.dashboard_host or host.ray_ip}", f"--dashboard-port={r.dashboard_port}"]
        else:
            args += [f"--address={self.address}"]
        num_cpus = host.cpus if host.cpus is not None else r.num_cpus
        if num_cpus is not None:
            args.append(f"--num-cpus={num_cpus}")
        if r.object_store_memory is not None:
            args.append(f"--object-store-memory={r.object_store_memory}")
        if r.node_manager_port:
            args.append(f"--node-manager-port={r.node_manager_port}")
        if r.object_manager_port:
            args.append(f"--object-manager-port={r.object_manager_port}")
        if host.gpu_type:
            args.append("--resources=" + json.dumps({f"accelerator_type:{host.gpu_type}": 1}))
        return " ".join(shlex.quote(a) for a in args)

    def start_command(self, host: Host) -> str:
        """``ray start`` on ``host`` as run over SSH (in the container, or natively in its own session)."""
        start = f"mkdir -p {shlex.quote(self.ray.temp_dir)} && {self.ray_start_command(host)}"
        if self.docker:
            return self.in_node(start)
        # Its own session, its id in the pid file: a `ray start` that never returns
        # (a host cut off from the head) can be found and ended by stop_command.
        inner = f"echo $$ > {self.secret_path('pid')} && . {self.secret_path('env')} && exec sh -c {shlex.quote(start)}"
        return f"setsid -w sh -c {shlex.quote(inner)}"

    def stop_command(self) -> str:
        """Stop Ray on a host and check by looking that none of it is left; exit 0 only then.

        Ends, in order: what is left of a `ray start` of this cluster (its session,
        from the pid file: it may never have returned), Ray's daemons (``ray stop
        --force``), then waits until no raylet/gcs_server runs there.
        """
        if self.docker:
            name = shlex.quote(self.docker.name)
            return (f"docker exec {name} {shlex.quote(self.ray_cli())} stop --force >/dev/null 2>&1; "
                    f"docker rm -f {name} >/dev/null 2>&1; "
                    f"if docker inspect {name} >/dev/null 2>&1; then echo 'LEFT container {name}'; exit 1; fi")
        pidfile = self.secret_path("pid")
        session_left = ('for p in $(pgrep -s "$sid" 2>/dev/null); do case "$(tr "\\0" " " < /proc/$p/cmdline 2>/dev/null)" '
                        'in *ray*) echo $p;; esac; done')
        return (
            f'sid=; if [ -r {pidfile} ]; then sid=$(cat {pidfile}); fi; '
            f'if [ -n "$sid" ]; then for p in $({session_left}); do kill -KILL $p 2>/dev/null; done; fi; '
            f"{shlex.quote(self.ray_cli())} stop --force >/dev/null 2>&1; "
            f"n=0; while :; do left=$(pgrep -x 'raylet|gcs_server'; [ -n \"$sid\" ] && {session_left}); "
            f'[ -z "$left" ] && break; n=$((n+1)); [ $n -gt {max(2, int(self.ray.command_timeout))} ] && break; '
            f'for p in $left; do kill -KILL $p 2>/dev/null; done; sleep 0.5; done; '
            f'if [ -n "$left" ]; then echo LEFT $(for p in $left; do cat /proc/$p/comm 2>/dev/null; done); exit 1; fi; '
            f"rm -f {pidfile}"
        )

    def ports(self, host: Host) -> list[int]:
        """The ports Ray will listen on at ``host`` (preflight checks they are free)."""
        r = self.ray
        ports = [p for p in (r.node_manager_port, r.object_manager_port) if p]
        if host is self.head:
            ports += [r.port, r.client_server_port] + ([r.dashboard_port] if r.dashboard else [])
        return ports
