"""Real SSH hosts emulated on one machine (root only), for fleetserve's cluster tests.

Each host is a network namespace ``fs-hN`` on a private bridge (``fsbr0``,
10.203.0.0/24) running its own ``sshd``, inside its own PID and mount
namespaces with private tmpfs on ``/run``, ``/dev/shm`` and ``/tmp``:

* the PID namespace is why ``ray stop`` on one host stops only that host's Ray
  (and why killing the namespace's init tears the whole host down at once);
* ``/run`` is private so sshd has its ``/run/sshd`` and Ray's ``--temp-dir``
  (``/run/fleetserve-ray``) never collides between hosts;
* ``/dev/shm`` is private so the preflight's shm check sees a per-host size;
* ``/tmp`` is private so Ray's ``/tmp/ray`` (``ray stop`` removes
  ``/tmp/ray/ray_current_cluster``) on a host never touches this machine's; only
  the emulator's work directory is bound back in, where it lies under ``/tmp``.

Teardown kills every process in the host's network or PID namespace (found by
namespace, not by name: sshd renames itself, so its command line does not
match), waits until none is left, then removes veth, netns and bridge. The
namespace ids are recorded in ``hosts.json``, so ``stop`` from another process
finds what ``start`` left.

The hosts share this machine's filesystem, so they all run the same venv.
Written by hand because no library does netns + sshd + PID namespaces; it
drives the standard tools (``ip``, ``unshare``, ``sshd``, ``ssh-keygen``),
found on ``PATH``; sshd (it must be started by absolute path) is the one named
by ``FLEETSERVE_SSHD``, else the first on ``PATH``, else ``/usr/sbin/sshd`` --
so the tools may come from a prefix of their own (the GPU machines have none
installed: benchmarks/gpu/rig-tools.sh unpacks Debian's there).

Per host, optionally (the GPU rig uses them, the CPU tests need none):

* ``env``: the host's login environment, ``SetEnv`` in its sshd_config, seen by
  everything started over SSH there (``CUDA_VISIBLE_DEVICES`` = its GPUs,
  ``NCCL_HOSTID``), as a real host's own environment would be;
* ``hostname``: its own UTS namespace and name, so what a process reports as
  its host (FlagGems' per-process reports, NCCL's host hash) tells hosts apart;
* ``shared_paths`` (per emulator): paths under ``/tmp`` besides the work
  directory that stay visible in every host's private ``/tmp`` (a Python stack
  or a model unpacked there).

Where this machine has no ``sshd`` privilege-separation user, or root's account
is locked (sshd without PAM then refuses key logins too), each host's mount
namespace gets a copy of ``/etc/passwd`` with the user added, or of
``/etc/shadow`` with root unlocked (this machine's files are never written).

Also a small CLI for manual use and the benchmark::

    python tests/hosts/emulation.py start 3     # prints the hostfile path
    python tests/hosts/emulation.py stop
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# tests/ holds the one wait helper; on the path also when this file runs as a script (the CLI below).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from waiting import wait_for  # noqa: E402

BRIDGE = "fsbr0"
SUBNET = "10.203.0"  # /24; .1 is the bridge (this machine), host N is .(10+N)
NS_PREFIX = "fs-h"
DEFAULT_WORKDIR = Path("/tmp/fleetserve-hosts")
SHADOW = Path("/etc/shadow")
VENV = Path(sys.executable).parent


def sshd_path() -> str:
    """The sshd to run: ``FLEETSERVE_SSHD``, else the first on PATH, else Debian's (absolute: sshd requires it)."""
    found = os.environ.get("FLEETSERVE_SSHD") or shutil.which("sshd") or "/usr/sbin/sshd"
    return str(Path(found).absolute())


def missing_requirements(sshd: str | None = None) -> str | None:
    """Why emulation cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network/PID namespaces, sshd)"
    for tool in ("ip", "unshare", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found on PATH (run scripts/setup-host-emulation.sh)"
    sshd = sshd or sshd_path()
    if not os.access(sshd, os.X_OK):
        return f"{sshd} not found (run scripts/setup-host-emulation.sh: openssh-server, or set FLEETSERVE_SSHD)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --pid not permitted here: {probe.stderr.strip()}"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns' not available: {probe.stderr.strip()}"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class EmulatedHost:
    index: int
    ip: str
    netns: str
    veth: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    recorded_ns: dict[str, str] = field(default_factory=dict)  # from hosts.json, for a stop in another process

    @property
    def name(self) -> str:
        return self.netns

    def host_key_line(self) -> str:
        pub = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()
        return f"{self.ip} {pub[0]} {pub[1]}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """Host PIDs of every process in this host's PID namespace."""
        if not self.alive():
            return []
        try:
            target = os.readlink(f"/proc/{self._init_pid()}/ns/pid")
        except (OSError, RuntimeError):
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns/pid") == target:
                        out.append(int(entry.name))
                except OSError:
                    continue
        return out

    def _init_pid(self) -> int:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        if not children:
            raise RuntimeError("namespace init not started")
        return int(children[0])

    def namespace_ids(self) -> dict[str, str]:
        """This host's ``net:[inode]`` and ``pid:[inode]`` (empty where gone), to find its processes later."""
        ids = {}
        try:
            ids["net"] = f"net:[{os.stat(f'/run/netns/{self.netns}').st_ino}]"
        except OSError:
            pass
        try:
            ids["pid"] = os.readlink(f"/proc/{self._init_pid()}/ns/pid")
        except (OSError, RuntimeError, AssertionError):
            pass
        return ids

    def process_names(self) -> list[str]:
        return [name for _, name in self._named_pids()]

    def kill(self, name: str) -> int:
        """SIGKILL the first process of this host whose command name is ``name`` (a host losing its
        ``raylet``, say); its PID here. AssertionError when the host runs none."""
        for pid, comm in self._named_pids():
            if comm == name:
                try:
                    os.kill(pid, signal.SIGKILL)
                    return pid
                except ProcessLookupError:
                    continue
        raise AssertionError(f"no {name} on {self.name}")

    def _named_pids(self) -> list[tuple[int, str]]:
        named = []
        for pid in self.pids():
            try:
                named.append((pid, Path(f"/proc/{pid}/comm").read_text().strip()))
            except OSError:
                continue
        return named


class HostEmulator:
    """Creates and destroys emulated hosts; safe to tear down after partial setup."""

    def __init__(self, workdir: Path = DEFAULT_WORKDIR, bridge: str = BRIDGE, subnet: str = SUBNET,
                 sshd: str | None = None, shared_paths: list[Path] | tuple[Path, ...] = (),
                 base_env: dict[str, str] | None = None):
        """``base_env``: login environment every host gets; a host's own ``env`` adds to it and wins."""
        self.workdir = Path(workdir)
        self.base_env = dict(base_env or {})
        self.bridge = bridge
        self.subnet = subnet
        self.sshd = sshd or sshd_path()
        self.shared_paths = [Path(p) for p in shared_paths]
        self.hosts: dict[int, EmulatedHost] = {}
        self.client_key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.authorized_keys = self.workdir / "authorized_keys"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.client_key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetserve-tests", "-f", str(self.client_key))
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        if _run("ip", "link", "show", self.bridge, check=False).returncode != 0:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "replace", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def add_host(self, index: int, env: dict[str, str] | None = None, shm_size: str = "2g",
                 hostname: str | None = None, run_size: str = "256m", tmp_size: str = "2g") -> EmulatedHost:
        """Start host ``fs-h<index>`` at ``<subnet>.<10+index>`` with its own sshd.

        ``env``: the host's login environment (sshd ``SetEnv``); ``hostname``: give the
        host its own UTS namespace with this name. ``*_size``: limits of the host's
        private tmpfs mounts (allocated only as used; Ray's temp dir lives in ``/run``).
        """
        netns, veth, ip = f"{NS_PREFIX}{index}", f"fsv{index}", f"{self.subnet}.{10 + index}"
        env = {**self.base_env, **(env or {})}
        setenv = sshd_setenv(env)
        if hostname is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", hostname):
            raise ValueError(f"hostname {hostname!r}: letters, digits and '-' only, at most 63")
        host = EmulatedHost(index, ip, netns, veth, self.workdir / netns, env=env)
        self.hosts[index] = host
        self._cleanup_host_leftovers(host)
        host.dir.mkdir(parents=True, exist_ok=True)
        key = host.dir / "ssh_host_ed25519_key"
        if not key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", self.bridge)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", f"{self.subnet}.1")
        (host.dir / "sshd_config").write_text(
            "\n".join(
                [
                    "Port 22",
                    f"ListenAddress {ip}",
                    f"HostKey {key}",
                    "PidFile /run/sshd.pid",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",  # the keys live under /tmp
                    "MaxStartups 64",
                    "MaxSessions 64",
                    "LogLevel ERROR",
                    *( [f"SetEnv {setenv}"] if setenv else [] ),
                    "",
                ]
            )
        )
        # PID 1 of the host is sshd itself: it reaps orphans (Ray's daemons), and
        # killing it (or unshare, via --kill-child) takes the whole host down.
        # The work directory (keys, sshd_config, fake site dirs) and the shared paths must stay visible on
        # the host where they lie under the private /tmp: park a bind of each in /run, mount /tmp, bind them back.
        keep = paths_kept_in_tmp([self.workdir, *self.shared_paths])
        passwd, shadow = self._passwd_with_sshd_user(), self._shadow_with_root_unlocked()
        script = " && ".join([
            *([f"echo {shlex.quote(hostname)} > /proc/sys/kernel/hostname"] if hostname else []),
            *([f"mount --bind {shlex.quote(str(passwd))} /etc/passwd"] if passwd else []),
            *([f"mount --bind {shlex.quote(str(shadow))} /etc/shadow"] if shadow else []),
            f"mount -t tmpfs -o size={run_size},mode=755 tmpfs /run", "mkdir -p /run/sshd",
            f"mount -t tmpfs -o size={shm_size},mode=1777 tmpfs /dev/shm",
            *[step for i, path in enumerate(keep)
              for step in (f"mkdir /run/keep{i}", f"mount --bind {shlex.quote(str(path))} /run/keep{i}")],
            f"mount -t tmpfs -o size={tmp_size},mode=1777 tmpfs /tmp",
            *[step for i, path in enumerate(keep)
              for step in (f"mkdir -p {shlex.quote(str(path))}", f"mount --bind /run/keep{i} {shlex.quote(str(path))}",
                           f"umount /run/keep{i}", f"rmdir /run/keep{i}")],
            f"exec {shlex.quote(self.sshd)} -D -e -f {host.dir / 'sshd_config'}",
        ])
        log = open(host.dir / "sshd.log", "wb")
        host.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--pid", "--mount", "--propagation", "private", "--fork",
             "--mount-proc", "--kill-child", *(["--uts"] if hostname else []),
             "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait_for_ssh(host)
        self.write_known_hosts()
        return host

    def _passwd_with_sshd_user(self) -> Path | None:
        """A copy of /etc/passwd with sshd's privilege-separation user, where this machine has none."""
        try:
            pwd.getpwnam("sshd")
            return None
        except KeyError:
            pass
        path = self.workdir / "passwd"
        text = Path("/etc/passwd").read_text()
        path.write_text(text.rstrip("\n") + "\nsshd:x:65533:65534:sshd privilege separation:/run/sshd:/bin/false\n")
        path.chmod(0o644)
        return path

    def _shadow_with_root_unlocked(self) -> Path | None:
        """A copy of /etc/shadow whose root entry is not locked, where it is ('!...').

        Without PAM, sshd refuses every login, keys too, to a locked account;
        container images often lock root. The copy says '*' (no password login),
        and is bound only into the hosts' mount namespaces.
        """
        try:
            lines = SHADOW.read_text().splitlines()
        except OSError:
            return None
        fields = [line.split(":") for line in lines]
        if not any(f[0] == "root" and len(f) > 1 and f[1].startswith("!") for f in fields):
            return None
        path = self.workdir / "shadow"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(":".join([f[0], "*", *f[2:]] if f[0] == "root" and len(f) > 1 else f) + "\n"
                             for f in fields))
        return path

    def _wait_for_ssh(self, host: EmulatedHost, timeout: float = 15.0) -> None:
        def listening() -> bool:
            if not host.alive():
                raise RuntimeError(f"sshd for {host.name} exited: {(host.dir / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((host.ip, 22), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(listening, timeout, f"sshd for {host.name} reachable at {host.ip}:22", poll=0.1)

    def write_known_hosts(self) -> None:
        self.known_hosts.write_text("".join(h.host_key_line() + "\n" for h in self.hosts.values()))

    def hostfile(self, indices: list[int] | None = None, slots: int = 2, extra_hosts: list[str] = (),
                 settings: dict[str, str] | None = None, path: Path | None = None,
                 host_keys: dict[int, str] | None = None) -> Path:
        """Write a hostfile for (some of) the hosts; returns its path.

        ``host_keys`` adds per-host keys to a host's line, e.g. ``{1: "cpus=1"}``.
        """
        chosen = [(i, self.hosts[i]) for i in (indices if indices is not None else sorted(self.hosts))]
        host_keys = host_keys or {}
        lines = [f"# emulated hosts ({self.bridge}, {self.subnet}.0/24); written by tests/hosts/emulation.py"]
        lines += [f"{h.ip} slots={slots} type=EMU {host_keys.get(i, '')}".rstrip() for i, h in chosen]
        lines += list(extra_hosts)
        lines += ["", "[cluster]"]
        merged = default_settings(self)
        merged.update(settings or {})
        lines += [f"{k} = {v}" for k, v in merged.items()]
        path = path or self.workdir / "hostfile"
        path.write_text("\n".join(lines) + "\n")
        return path

    # --------------------------------------------------------------- teardown
    def remove_host(self, index: int) -> None:
        host = self.hosts.pop(index, None)
        if host is not None:
            self._cleanup_host_leftovers(host)

    def _cleanup_host_leftovers(self, host: EmulatedHost, timeout: float = 15.0) -> None:
        """Kill every process of the host (by namespace), wait until they are gone, remove veth and netns."""
        ids = {**host.recorded_ns, **host.namespace_ids()}

        def all_gone() -> bool:
            left = namespace_pids(ids)
            for pid in left:  # again each round: a process may have forked since the last one
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            return not left

        wait_for(all_gone, timeout, f"{host.name}: every process gone after SIGKILL", poll=0.05,
                 state=lambda: f"left: {sorted(namespace_pids(ids))}")
        if host.proc is not None:
            host.proc.wait(timeout=timeout)  # reap unshare
        _run("ip", "link", "del", host.veth, check=False)
        _run("ip", "netns", "del", host.netns, check=False)

    def teardown(self) -> None:
        for index in list(self.hosts):
            self.remove_host(index)
        _run("ip", "link", "del", self.bridge, check=False)


def sshd_setenv(env: dict[str, str]) -> str:
    """The value of an sshd ``SetEnv`` line for ``env`` ('' for none); refuses what sshd would misread."""
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{key!r} is not an environment variable name")
        if any(c in value for c in '"\\\n\r'):
            raise ValueError(f"{key}: a value for sshd SetEnv may not hold '\"', '\\' or a line break")
    return " ".join(f'{k}="{v}"' for k, v in env.items())


def paths_kept_in_tmp(paths: list[Path]) -> list[Path]:
    """Of ``paths``, the existing ones under /tmp to bind back into a host's private /tmp, outermost only."""
    under = []
    for path in paths:
        resolved = Path(path).resolve()
        if (resolved.is_relative_to("/tmp") and resolved != Path("/tmp") and resolved.exists()
                and resolved not in under):
            under.append(resolved)
    return [p for p in under if not any(p != q and p.is_relative_to(q) for q in under)]


def namespace_pids(ids: dict[str, str]) -> set[int]:
    """PIDs (on this machine) of live processes in any of the namespaces ``ids`` (``net:[..]``/``pid:[..]``)."""
    wanted = {(kind, ns) for kind, ns in ids.items()}
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for kind in ("net", "pid"):
            try:
                if (kind, os.readlink(entry / "ns" / kind)) in wanted:
                    out.add(int(entry.name))
                    break
            except OSError:  # gone, or a zombie (its namespaces are released)
                break
    return out


def default_settings(emu: HostEmulator) -> dict[str, str]:
    """``[cluster]`` settings for emulated hosts: the venv's python/ray, small logical nodes."""
    return {
        "name": "emulated",
        "ssh.user": "root",
        "ssh.key": str(emu.client_key),
        "ssh.known_hosts": str(emu.known_hosts),
        "ssh.connect_timeout": "5",
        "ssh.use_agent": "false",
        "ray.python": str(VENV / "python"),
        "ray.ray": str(VENV / "ray"),
        "ray.temp_dir": "/run/fleetserve-ray",
        # The hosts share this machine's home; their token, env and pid files must not.
        "ray.secrets_dir": "/run/fleetserve-secrets",
        "ray.num_cpus": "4",
        "ray.object_store_memory": str(100 * 1024 * 1024),
        "ray.min_shm_bytes": str(512 * 1024 * 1024),
        "ray.join_timeout": "60",
        "env.RAY_DEDUP_LOGS": "0",
        # Each host's /tmp is private and fresh: share torch's compile cache between hosts and runs.
        "env.TORCHINDUCTOR_CACHE_DIR": str(emu.workdir / "torchinductor"),
        # Ray's dashboard gives each module 30 s to start; a loaded 2-core CI box needs longer.
        "env.RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "240",
    }


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start")
    start.add_argument("n", type=int)
    start.add_argument("--slots", type=int, default=2)
    sub.add_parser("stop")
    args = parser.parse_args(argv)
    emu = HostEmulator(args.workdir)
    state = emu.workdir / "hosts.json"
    if args.cmd == "start":
        why = missing_requirements()
        if why:
            print(why, file=sys.stderr)
            return 2
        emu.setup()
        for i in range(1, args.n + 1):
            emu.add_host(i)  # the namespaces outlive this process (sshd runs in its own session)
            state.write_text(json.dumps({i: {"ip": h.ip, "ns": h.namespace_ids()} for i, h in emu.hosts.items()}))
        print(emu.hostfile(slots=args.slots))
        return 0
    recorded = json.loads(state.read_text()) if state.exists() else {}
    for i, rec in recorded.items():
        rec = rec if isinstance(rec, dict) else {"ip": rec, "ns": {}}
        emu.hosts[int(i)] = EmulatedHost(int(i), rec["ip"], f"{NS_PREFIX}{i}", f"fsv{i}",
                                         emu.workdir / f"{NS_PREFIX}{i}", recorded_ns=rec["ns"])
    emu.teardown()
    state.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
