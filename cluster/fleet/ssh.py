"""SSH to every host of a cluster in parallel (paramiko), with host keys checked.

* Host keys are checked against ``ssh.known_hosts``; an unknown key is refused
  unless the caller trusts new keys on purpose (``--trust-new-host-keys``),
  in which case it is appended to known_hosts with its fingerprint logged.
  A *changed* key is always refused.
* Auth: the configured key file, else ssh-agent and ``~/.ssh/id_*``.
* Each failure is an :class:`SSHError` naming the host, the reason and the fix.

paramiko does the protocol; this module adds the policy (known_hosts + trust
flag), the thread pool, and per-host results, which paramiko leaves to callers.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko

from cluster.errors import FleetserveError
from cluster.fleet.hostfile import ClusterConfig, Host

T = TypeVar("T")


class SSHError(FleetserveError):
    """A host could not be reached/used over SSH: which host, why, and the fix."""

    def __init__(self, host: str, reason: str, fix: str | None = None):
        self.host, self.reason, self.fix = host, reason, fix
        super().__init__(f"{host}: {reason}" + (f"\n  fix: {fix}" if fix else ""))


class UnknownHostKeyError(SSHError):
    pass


class HostKeyMismatchError(SSHError):
    pass


class AuthError(SSHError):
    pass


class UnreachableError(SSHError):
    pass


class CommandTimeout(SSHError):
    """A remote command passed its deadline; the channel was closed, the process may still run there."""


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(address: str, port: int) -> str:
    """OpenSSH's known_hosts spelling: ``host`` on port 22, else ``[host]:port``."""
    return address if port == 22 else f"[{address}]:{port}"


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys, or (trust=True) record them in known_hosts."""

    def __init__(self, pool: SSHPool, host: Host):
        self.pool, self.host = pool, host

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fp = fingerprint(key)
        if not self.pool.trust_new_host_keys:
            port = self.pool.config.ssh_port(self.host)
            raise UnknownHostKeyError(
                self.host.name,
                f"host key {key.get_name()} {fp} is not in {self.pool.known_hosts_path}",
                f"check the fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_{key.get_name().split('-')[-1]}_key.pub), "
                f"then add it (ssh-keyscan -p {port} {self.host.address} >> {self.pool.known_hosts_path}) "
                "or re-run with --trust-new-host-keys",
            )
        self.pool._remember_key(hostname, key)


@dataclass
class CommandResult:
    host: str
    command: str
    exit_status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def tail(self, n: int = 15) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-n:])


class Redactor:
    """Replaces secret values (the hostfile's ``env.*`` values) in any text meant for people.

    Every value is treated as secret: the hostfile does not say which ones are
    (HF_TOKEN, WANDB_API_KEY, ...), and showing ``NCCL_DEBUG=***`` costs nothing.
    Values shorter than 4 characters are left alone: redacting ``1`` or ``on``
    would mangle every message and protect nothing.
    """

    MASK = "***"

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, self.MASK)
        return text


def env_prefix(env: Mapping[str, str]) -> str:
    """``env K=V ...`` prefix: sshd's AcceptEnv usually drops client-sent variables."""
    if not env:
        return ""
    return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "


class SSHPool:
    """One paramiko connection per host, opened in parallel, reused for every command."""

    def __init__(self, config: ClusterConfig, trust_new_host_keys: bool = False, max_workers: int = 32,
                 on_new_key: Callable[[str, str], None] | None = None):
        self.config = config
        self.trust_new_host_keys = trust_new_host_keys
        self.known_hosts_path = Path(config.settings.ssh.known_hosts).expanduser()
        self.max_workers = max_workers
        self.on_new_key = on_new_key
        self._clients: dict[str, paramiko.SSHClient] = {}
        self._lock = threading.Lock()
        self._host_keys = paramiko.HostKeys()
        self.redact = Redactor(config.settings.env.values())
        if self.known_hosts_path.exists():
            try:
                self._host_keys.load(str(self.known_hosts_path))
            except (OSError, paramiko.SSHException) as exc:
                raise SSHError("known_hosts", f"cannot read {self.known_hosts_path}: {exc}",
                               "fix or remove the malformed line") from None

    # ------------------------------------------------------------------ keys
    def _remember_key(self, hostname: str, key: paramiko.PKey) -> None:
        with self._lock:
            self._host_keys.add(hostname, key.get_name(), key)
            self.known_hosts_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts_path, "a") as fh:
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        if self.on_new_key:
            self.on_new_key(hostname, f"{key.get_name()} {fingerprint(key)}")

    # --------------------------------------------------------------- connect
    def connect(self, host: Host) -> paramiko.SSHClient:
        with self._lock:
            client = self._clients.get(host.name)
        if client is not None and client.get_transport() is not None and client.get_transport().is_active():
            return client
        ssh = self.config.settings.ssh
        port = self.config.ssh_port(host)
        user = self.config.ssh_user(host)
        client = paramiko.SSHClient()
        with self._lock:
            for hostname, keys in self._host_keys.items():
                for ktype, key in keys.items():
                    client.get_host_keys().add(hostname, ktype, key)
        client.set_missing_host_key_policy(_KnownHostsPolicy(self, host))
        key_file = str(Path(ssh.key).expanduser()) if ssh.key else None
        try:
            client.connect(
                host.address, port=port, username=user, key_filename=key_file,
                allow_agent=ssh.use_agent, look_for_keys=key_file is None,
                timeout=ssh.connect_timeout, banner_timeout=ssh.connect_timeout,
                auth_timeout=ssh.connect_timeout, channel_timeout=ssh.connect_timeout,
            )
        except SSHError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatchError(
                host.name,
                f"host key changed: known_hosts has {fingerprint(exc.expected_key)}, the host sent "
                f"{fingerprint(exc.key)} (reinstalled host, or someone in the middle)",
                f"if the host was reinstalled, remove the old key: ssh-keygen -R "
                f"'{known_hosts_name(host.address, port)}' -f {self.known_hosts_path}, then add the new one",
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            how = f"key {key_file}" if key_file else "ssh-agent / ~/.ssh/id_*"
            raise AuthError(
                host.name, f"authentication as {user!r} with {how} failed: {exc}",
                f"put the public key in ~{user}/.ssh/authorized_keys on {host.address}, "
                "or set ssh.key / user= to the right key and user",
            ) from None
        except FileNotFoundError as exc:
            client.close()
            raise AuthError(host.name, f"ssh key not found: {exc.filename}", "fix ssh.key in the cluster settings") from None
        except (socket.timeout, TimeoutError) as exc:
            client.close()
            raise UnreachableError(host.name, f"no answer on {host.address}:{port} within "
                                   f"{ssh.connect_timeout:g}s ({exc or 'timeout'})",
                                   "check the address, that sshd runs there and that no firewall drops port "
                                   f"{port}; raise ssh.connect_timeout on slow links") from None
        except (paramiko.ssh_exception.NoValidConnectionsError, OSError) as exc:
            client.close()
            raise UnreachableError(host.name, f"cannot connect to {host.address}:{port}: {exc}",
                                   f"check the address and that sshd listens on port {port} (port= in the hostfile)") from None
        except paramiko.SSHException as exc:
            client.close()
            raise SSHError(host.name, f"SSH handshake failed: {exc}", "check that the port is an SSH server") from None
        with self._lock:
            self._clients[host.name] = client
        return client

    # ------------------------------------------------------------------- run
    def run(self, host: Host, command: str, timeout: float = 120.0, stdin: str | None = None,
            env: Mapping[str, str] | None = None, on_line: Callable[[str, str], None] | None = None) -> CommandResult:
        """Run a shell command on ``host``; stdout/stderr collected (and streamed to ``on_line``)."""
        client = self.connect(host)
        full = env_prefix(env or {}) + command
        start = time.monotonic()
        transport = client.get_transport()
        assert transport is not None
        chan = transport.open_session(timeout=self.config.settings.ssh.connect_timeout)
        chan.settimeout(timeout)
        chan.exec_command(full)
        if stdin is not None:
            chan.sendall(stdin.encode())
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        pending = {"stdout": b"", "stderr": b""}
        deadline = start + timeout

        def feed(stream: str, data: bytes) -> None:
            if not on_line:
                return
            buf = pending[stream] + data
            *lines, pending[stream] = buf.split(b"\n")
            for line in lines:
                on_line(stream, line.decode(errors="replace"))

        def read_stdout() -> None:
            nonlocal out
            data = chan.recv(65536)
            out += data
            feed("stdout", data)

        def read_stderr() -> None:
            nonlocal err
            data = chan.recv_stderr(65536)
            err += data
            feed("stderr", data)

        while True:
            if chan.recv_ready():
                read_stdout()
            elif chan.recv_stderr_ready():
                read_stderr()
            elif chan.exit_status_ready():
                # drain what arrived with the exit status
                while chan.recv_ready():
                    read_stdout()
                while chan.recv_stderr_ready():
                    read_stderr()
                break
            elif time.monotonic() > deadline:
                chan.close()
                raise CommandTimeout(host.name, f"command timed out after {timeout:g}s: {self.redact(command[:200])}",
                                     "check the host's load and its route to the head, or raise the timeout")
            else:
                time.sleep(0.02)
        for stream in ("stdout", "stderr"):
            if on_line and pending[stream]:
                on_line(stream, pending[stream].decode(errors="replace"))
        status = chan.recv_exit_status()
        chan.close()
        return CommandResult(host.name, command, status, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.monotonic() - start)

    def map(self, hosts: Iterable[Host], fn: Callable[[Host], T]) -> dict[str, T | BaseException]:
        """``fn(host)`` on every host in parallel; per-host result or the exception it raised."""
        hosts = list(hosts)
        results: dict[str, T | BaseException] = {}
        if not hosts:
            return results
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(hosts))) as pool:
            futures = {h.name: pool.submit(fn, h) for h in hosts}
            for name, fut in futures.items():
                try:
                    results[name] = fut.result()
                except BaseException as exc:  # noqa: BLE001 - reported per host
                    results[name] = exc
        return results

    def connect_all(self, hosts: Iterable[Host] | None = None) -> dict[str, SSHError | None]:
        out = self.map(hosts if hosts is not None else self.config.hosts, self.connect)
        return {name: (r if isinstance(r, BaseException) else None) for name, r in out.items()}  # type: ignore[misc]

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> SSHPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
