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

What the layer above needs on the nodes (environment for its Ray processes) and
to know about them (a workload to move off a drained node, its own status
programs) comes in as arguments: ``node_env``, ``drain(workload=...)`` and
:meth:`RayCluster.run_on_head`. Progress goes to a ``progress`` factory passed
in (the CLI's live table); secrets are redacted before it sees them.

Why not Ray's cluster launcher (``ray up`` with the local provider): it starts
hosts one after another, has no preflight (a version skew shows up later as a
hang or an obscure GCS error), cannot give one node a per-host NCCL interface,
and its rollback is "run ray down"; fleetserve needs all of that for bare-metal
GPU hosts. Ray itself still does all the cluster work (``ray start``/``stop``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from rich.console import Console

from cluster.errors import FleetserveError
from cluster.fleet import remote
from cluster.fleet.hostfile import ClusterConfig, Host
from cluster.fleet.preflight import PACKAGES, Probe, preflight
from cluster.fleet.raystart import TRANSIENT_START_ERROR, NodeCommands, label_value, node_env
from cluster.fleet.remote import drain as drain_program, head_query as head_query_program, probe as probe_program
from cluster.fleet.ssh import CommandResult, CommandTimeout, Redactor, SSHError, SSHPool
from cluster.fleet.state import forget_cluster, record_cluster, state_file


class HostProgress(Protocol):
    """Where the fleet layer reports per-host progress (the CLI passes its live table)."""

    def update(self, host: str, message: str, mark: str = "…") -> None: ...

    def ok(self, host: str, message: str) -> None: ...

    def fail(self, host: str, message: str) -> None: ...

    def note(self, message: str) -> None: ...


#: ``factory(hosts, title)`` -> a context manager giving the operation's HostProgress.
ProgressFactory = Callable[[list[str], str], AbstractContextManager[HostProgress]]


class _Quiet:
    """The default progress: none (a library caller that passes no factory sees only results and errors)."""

    def update(self, host: str, message: str, mark: str = "…") -> None:
        pass

    def ok(self, host: str, message: str) -> None:
        pass

    def fail(self, host: str, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@contextmanager
def quiet_progress(hosts: list[str], title: str) -> Iterator[HostProgress]:
    yield _Quiet()


class _Redacting:
    """A HostProgress that passes everything on with hostfile env values (HF_TOKEN=...) masked."""

    def __init__(self, inner: HostProgress, redact: Callable[[str], str]):
        self.inner, self.redact = inner, redact

    def update(self, host: str, message: str, mark: str = "…") -> None:
        self.inner.update(host, self.redact(message), mark)

    def ok(self, host: str, message: str) -> None:
        self.update(host, message, "✓")

    def fail(self, host: str, message: str) -> None:
        self.update(host, message, "✗")

    def note(self, message: str) -> None:
        self.inner.note(self.redact(message))


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


def _left(deadline: float, host: Host) -> float:
    """Seconds left before ``deadline``; past it, the bring-up has run out of time."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise CommandTimeout(host.name, "no time left for this step", "raise --timeout / ray.join_timeout")
    return left


def _result_line(stdout: str) -> dict[str, Any] | None:
    """The last ``RESULT {json}`` line a head program printed, if any."""
    found = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(found[-1]) if found else None


class RayCluster:
    """Bring-up, tear-down, status, drain and exec for the hosts of one hostfile.

    ``node_env``: environment the layer above needs on every node (the hostfile's
    ``env.*`` wins over it); ``progress``: where per-host progress goes.
    """

    def __init__(self, config: ClusterConfig, trust_new_host_keys: bool = False, console: Console | None = None,
                 state_dir: Path | None = None, node_env: Mapping[str, str] | None = None,
                 progress: ProgressFactory = quiet_progress):
        self.config = config
        self.ray = config.settings.ray
        self.docker = config.settings.docker
        self.node = NodeCommands(config)
        self.extra_env = dict(node_env or {})
        self.progress_factory = progress
        # Console: for warnings only (auth off, a host key trusted); progress goes to ``progress``.
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

    @contextmanager
    def _progress(self, hosts: list[str], title: str) -> Iterator[HostProgress]:
        with self.progress_factory(hosts, title) as inner:
            yield _Redacting(inner, self.redact)

    @property
    def head(self) -> Host:
        return self.config.head

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def dashboard_url(self) -> str | None:
        return f"http://{self.head.ray_ip}:{self.ray.dashboard_port}" if self.ray.dashboard else None

    # ---------------------------------------------------------------- secrets
    @property
    def token_file(self) -> Path:
        """This machine's copy of the cluster's Ray token (0600, next to the state file)."""
        key = label_value(f"{self.config.settings.name}-{self.head.ray_ip}-{self.ray.port}")
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
                     f"{label_value(self.config.settings.name)}.token) to {path} with mode 0600, "
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

    def _put_secret(self, host: Host, kind: str, content: str) -> None:
        """Write one file of the secrets dir on ``host`` with mode 0600, its content over stdin (never argv)."""
        r = self.pool.run(host, self.node.put_secret_command(kind), stdin=content, timeout=self.ray.command_timeout)
        if not r.ok:
            raise SSHError(host.name, f"cannot write {self.ray.secrets_dir} ({kind}): {r.tail(3)}",
                           "check that ray.secrets_dir is writable there")

    # ---------------------------------------------------------------- probing
    def probe(self, host: Host) -> Probe:
        args = json.dumps({"packages": PACKAGES, "ports": self.node.ports(host), "head_ip": self.head.ray_ip,
                           "head_port": self.ray.port, "start_pidfile": self.node.start_pidfile()})
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
        result = self.pool.run(host, cmd, stdin=remote.program_source(probe_program), timeout=self.ray.command_timeout)
        if not result.ok:
            raise SSHError(host.name, f"probe failed (exit {result.exit_status}): {result.tail(5)}",
                           f"check that {self.node.python()!r} runs on the host (ray.python / docker.python)")
        try:
            probe = Probe.parse(host.name, result.stdout)
        except (ValueError, KeyError, IndexError) as exc:
            raise SSHError(host.name, f"probe printed no result ({exc}): {result.tail(5)}", None) from None
        if self.docker:
            probe.raw["container_running"] = running.stdout.strip() == "true"
        return probe

    # ---------------------------------------------------------- head programs
    def _ray_init_kwargs(self) -> dict[str, Any]:
        """How a program on the head joins the cluster as a driver.

        ``_node_ip_address`` is private in ``ray.init`` (checked against Ray 2.58.0)
        and has no public equivalent: without it the driver guesses its node's IP
        and, on a host with several addresses, may find no raylet of this cluster.
        """
        return {"address": self.address, "_node_ip_address": self.head.ray_ip, "logging_level": logging.ERROR,
                "log_to_driver": False, "namespace": "fleetserve-admin"}

    def _run_program(self, program: ModuleType, args: dict[str, Any], timeout: float,
                     on_line: Callable[[str, str], None] | None) -> tuple[dict[str, Any] | None, CommandResult]:
        args = {**args, "address": self.address, "ray_init": self._ray_init_kwargs()}
        cmd = self.node.in_node(f"{shlex.quote(self.node.python())} - {shlex.quote(json.dumps(args))}")
        r = self.pool.run(self.head, cmd, stdin=remote.program_source(program),
                          timeout=timeout + self.ray.command_timeout, on_line=on_line)
        return _result_line(r.stdout), r

    @_redacting
    def run_on_head(self, program: ModuleType, args: dict[str, Any], timeout: float = 0.0,
                    on_line: Callable[[str, str], None] | None = None) -> dict[str, Any]:
        """Run ``program`` (a module, shipped by its source) on the head, connected to the cluster; its RESULT.

        The program gets ``args`` plus ``address`` (the GCS) and ``ray_init``
        (keyword arguments for ``ray.init``) as JSON in ``argv[1]``, runs where
        Ray runs (the container, or with the node's env file: the token), and
        prints ``RESULT {json}`` last. ``timeout``: its own running time, beyond
        ``ray.command_timeout``.
        """
        found, r = self._run_program(program, args, timeout, on_line)
        if found is None:
            raise SSHError(self.head.name, f"{program.__name__} on the head gave no result: {r.tail(8)}",
                           "check that Ray runs on the head (fleetserve status)")
        return found

    def head_query(self, wait_for: list[str] | None = None, timeout: float = 0.0,
                   on_line: Callable[[str, str], None] | None = None,
                   exclude: list[str] | None = None) -> dict[str, Any]:
        """Ask Ray on the head about the cluster's nodes (and optionally wait for node IPs to join).

        A node is ``alive`` only when the GCS says so and its raylet's port answers;
        ``exclude`` lists node ids that do not count as joined (a host's old node).
        """
        found, r = self._run_program(head_query_program, {"wait_for": wait_for or [], "timeout": timeout,
                                                          "exclude": exclude or []}, timeout, on_line)
        if found is None:
            raise SSHError(self.head.name, f"cannot query Ray on the head at {self.address}: {r.tail(8)}",
                           "check that Ray runs on the head (fleetserve status) and that ray.port is right")
        return found

    # ------------------------------------------------------------------- up
    def _start(self, host: Host, probe: Probe, progress: HostProgress, deadline: float) -> None:
        """Write the host's token and env file (0600), then ``ray start`` there, within ``deadline``."""
        env = node_env(self.config, host, probe, self.extra_env)
        if self.ray.auth == "token":
            self._put_secret(host, "token", self._cluster_token)
        self._put_secret(host, "env", self.node.env_file_text(env))
        if self.docker:
            progress.update(host.name, f"starting container {self.docker.name} ({self.docker.image})")
            r = self.pool.run(host, f"docker rm -f {shlex.quote(self.docker.name)} >/dev/null 2>&1; "
                              + self.node.docker_run_command(host, env), timeout=_left(deadline, host))
            if not r.ok:
                raise SSHError(host.name, f"docker run failed: {r.tail(5)}", "check docker.image and that the daemon runs")
        progress.update(host.name, f"ray start ({'head' if host is self.head else 'worker'}, "
                        f"{host.slots} GPU slot(s), iface {env.get('NCCL_SOCKET_IFNAME', '?')})")
        cmd = self.node.start_command(host)
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
        """Stop Ray on one host and check by looking that none of it is left; ok only then."""
        timeout = self.ray.command_timeout if self.docker else self.ray.command_timeout + 30
        return self.pool.run(host, self.node.stop_command(), timeout=timeout)

    def _rollback(self, started: list[Host], progress: HostProgress) -> tuple[list[str], dict[str, str]]:
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
        with self._progress([h.name for h in hosts], f"fleetserve up {self.config.source}") as progress:
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
            problems = preflight(self.config, probes, to_start, self.address)
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
                    if name in {h.name for h in hosts}:
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
                               "gpus": probes[h.name].gpus,
                               "versions": {"python": probes[h.name].python, **probes[h.name].packages}}
                      for h in self.config.hosts},
            "nodes": nodes,
        }

    # ------------------------------------------------------------ down/status
    @_redacting
    def down(self) -> dict[str, str]:
        """Stop Ray on every host (workers first). Returns per-host outcome; unreachable hosts are reported."""
        out: dict[str, str] = {}
        with self._progress([h.name for h in self.config.hosts], "fleetserve down") as progress:
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
        if out.get(self.head.name) == "stopped":
            forget_cluster(self.state_dir, self.address)
        return out

    @_redacting
    def status(self) -> dict[str, Any]:
        """Ray's node table against the hostfile: per-host state, extra nodes, dashboard URL.

        A node counts as alive only if its raylet answers now (not after the GCS's
        health-check timeout), so ``status`` and ``up`` agree on a dead node at once.
        """
        state = self.head_query()
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
                "gpus_total": sum(n["resources"].get("GPU", 0) for n in state["nodes"] if n["alive"])}

    @_redacting
    def drain(self, name: str, timeout: float = 600.0, force: bool = False,
              workload: ModuleType | None = None) -> dict[str, Any]:
        """Take one worker host out of service without failing the work it holds.

        Ray's GCS drains the node (nothing new is scheduled there); ``workload``,
        a head program (see :meth:`run_on_head`) of the layer above, is run with
        ``phase=check`` first (its ``error``/``fix`` refuses the drain, before
        anything changed) and with ``phase=wait`` after the drain, until it has
        moved its work off (its ``PROGRESS`` lines show on the host's line). Only
        then is Ray stopped on the host. The host can then be removed from the
        hostfile; ``fleetserve up`` brings it back.
        """
        host = self.config.host(name)
        if host is self.head:
            raise ClusterError(f"{host.name} is the head: it runs the GCS and Serve's controller and cannot be "
                               "drained", {host.name: "fix: drain worker hosts only; `fleetserve down` stops all"})
        t0 = time.monotonic()
        with self._progress([host.name], f"fleetserve drain {host.name}") as progress:

            def step(program: ModuleType, args: dict[str, Any], seconds: float) -> dict[str, Any]:
                def on_line(stream: str, line: str) -> None:
                    if stream == "stdout" and line.startswith("PROGRESS "):
                        progress.update(host.name, line[len("PROGRESS "):])

                found, r = self._run_program(program, args, seconds, on_line)
                if found is None:
                    progress.fail(host.name, "drain did not finish")
                    raise ClusterError(f"cannot drain {host.name}", {self.head.name: r.tail(8)})
                if "error" in found:
                    progress.fail(host.name, found["error"])
                    raise ClusterError(f"cannot drain {host.name}: {found['error']}",
                                       {host.name: found.get("fix", "nothing was stopped; the node keeps serving")})
                return found

            progress.update(host.name, "asking Ray to drain the node")
            checked = step(workload, {"phase": "check", "ip": host.ray_ip, "force": force}, 0.0) if workload else {}
            node_id = step(drain_program, {"ip": host.ray_ip, "timeout": timeout}, 0.0)["node_id"]
            progress.update(host.name, "draining")
            t_drained = time.monotonic()
            emptied = (step(workload, {"phase": "wait", "node_id": node_id, "timeout": timeout}, timeout)
                       if workload else {})
            seconds_to_empty = emptied.get("seconds", round(time.monotonic() - t_drained, 2))
            progress.update(host.name, "nothing left to move; stopping Ray")
            stopped = self.stop_host(host)
            if not stopped.ok:
                progress.fail(host.name, f"ray stop failed: {stopped.tail(3)}")
                raise ClusterError(f"{host.name} was drained but Ray did not stop", {host.name: stopped.tail(8)})
            progress.ok(host.name, f"drained in {time.monotonic() - t0:.1f}s, Ray stopped")
        return {"host": host.name, "node_id": node_id, "seconds_to_empty": seconds_to_empty,
                "seconds": round(time.monotonic() - t0, 2),
                "interrupted_replicas": checked.get("interrupted_replicas", [])}

    def exec(self, command: str, on_line: Callable[[str, str, str], None],
             hosts: list[Host] | None = None, in_container: bool = True) -> dict[str, int | str]:
        """Run ``command`` on every host in parallel; each output line goes to ``on_line(host, stream, line)``."""
        def run(h: Host) -> int:
            # With the node's environment natively too, so `ray status` etc. there present the token.
            cmd = self.node.in_node(command) if (in_container or not self.docker) else command
            r = self.pool.run(h, cmd, timeout=3600, on_line=lambda s, line: on_line(h.name, s, self.redact(line)))
            return r.exit_status

        results = self.pool.map(hosts or list(self.config.hosts), run)
        return {n: (r if isinstance(r, int) else str(r)) for n, r in results.items()}

    def _save_state(self) -> None:
        record_cluster(self.state_dir, Path(self.config.source), self.address, self.dashboard_url,
                       self.token_file if self.ray.auth == "token" else None)
