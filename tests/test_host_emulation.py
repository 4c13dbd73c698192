"""The host emulator itself: ``stop`` leaves nothing behind, and each host's /tmp is its own.

Root only (skips with the reason elsewhere); run under the heavy-test lock.
``start`` and ``stop`` run as the CLI, in separate processes, as the benchmark
and a user run them: ``stop`` must find what ``start`` left from its record.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hosts.emulation import BRIDGE, namespace_pids  # noqa: E402
from hosts.fixtures import require_emulation  # noqa: E402

pytestmark = [pytest.mark.hosts, pytest.mark.slow, pytest.mark.timeout(300)]

EMULATION = Path(__file__).parent / "hosts" / "emulation.py"


def emulation(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EMULATION), "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=120)


def ssh(workdir: Path, ip: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-i", str(workdir / "id_ed25519"), "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"root@{ip}", command],
                          capture_output=True, text=True, timeout=60)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_stop_leaves_no_process_namespace_or_bridge(tmp_path: Path) -> None:
    require_emulation()
    if BRIDGE in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout:
        pytest.skip(f"bridge {BRIDGE} is in use (run host tests one at a time, under the heavy lock)")
    workdir = Path("/tmp") / f"fleetserve-emu-{uuid.uuid4().hex[:8]}"  # under /tmp: the bind-back path is tested
    try:
        r = emulation(workdir, "start", "2")
        assert r.returncode == 0, r.stderr
        recorded = json.loads((workdir / "hosts.json").read_text())
        ids = {i: rec["ns"] for i, rec in recorded.items()}
        assert all(set(ns) == {"net", "pid"} for ns in ids.values()), ids
        ip = recorded["1"]["ip"]

        # A daemon started over SSH (as `ray start` is: it outlives the session), plus files in /tmp both ways.
        probe = f"emulated-probe-{uuid.uuid4().hex[:8]}"
        (Path("/tmp") / f"{probe}-machine").write_text("machine")
        r = ssh(workdir, ip, f"setsid sleep 100000 </dev/null >/dev/null 2>&1 & mkdir -p /tmp/ray && touch /tmp/{probe} "
                f"&& ls /tmp && test -f {workdir / 'hostfile'} && echo workdir-visible")
        assert r.returncode == 0, r.stderr
        assert "workdir-visible" in r.stdout  # the work directory is bound into the private /tmp
        assert f"{probe}-machine" not in r.stdout  # the host does not see this machine's /tmp ...
        assert not (Path("/tmp") / probe).exists()  # ... nor this machine the host's
        host1 = namespace_pids({"pid": ids["1"]["pid"]})
        assert len(host1) >= 2, "sshd and the daemon run in host 1's PID namespace"

        r = emulation(workdir, "stop")
        assert r.returncode == 0, r.stderr
        for i, ns in ids.items():
            assert not namespace_pids(ns), f"processes of host {i} left after stop"
        assert not {"fs-h1", "fs-h2"} & netns_names()
        assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
        assert not (workdir / "hosts.json").exists()
    finally:
        emulation(workdir, "stop")
        (Path("/tmp") / f"{probe}-machine").unlink(missing_ok=True) if "probe" in locals() else None
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def test_a_host_has_its_own_login_env_name_and_the_shared_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the GPU rig gives each host (benchmarks/gpu/two_host_rig.py): env over SSH, a host name, /tmp paths;
    and sshd starts where the machine lacks its privilege-separation user (the GPU machines do)."""
    from hosts import emulation
    from hosts.emulation import HostEmulator

    require_emulation()
    if BRIDGE in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout:
        pytest.skip(f"bridge {BRIDGE} is in use (run host tests one at a time, under the heavy lock)")
    workdir = Path("/tmp") / f"fleetserve-emu-{uuid.uuid4().hex[:8]}"
    shared = Path("/tmp") / f"fleetserve-shared-{uuid.uuid4().hex[:8]}"
    (shared / "site").mkdir(parents=True)
    (shared / "site" / "marker").write_text("stack\n")
    emu = HostEmulator(workdir, shared_paths=[shared / "site", shared])
    try:
        emu.setup()
        emu.add_host(1, env={"CUDA_VISIBLE_DEVICES": "2,3", "NCCL_HOSTID": "rig-h1"}, hostname="gpu-host-1")
        real_getpwnam = emulation.pwd.getpwnam

        def no_sshd_user(name: str):
            if name == "sshd":
                raise KeyError(name)
            return real_getpwnam(name)

        monkeypatch.setattr(emulation.pwd, "getpwnam", no_sshd_user)
        # ... and where root's account is locked (a container image's /etc/shadow saying 'root:!:...').
        locked = shared / "shadow"
        locked.write_text("".join(":".join([f[0], "!", *f[2:]]) + "\n" if f[0] == "root" else line + "\n"
                                  for line in Path("/etc/shadow").read_text().splitlines()
                                  for f in [line.split(":")]))
        monkeypatch.setattr(emulation, "SHADOW", locked)
        emu.add_host(2, env={"CUDA_VISIBLE_DEVICES": "0"})  # copies with the user / root unlocked, bound in
        assert (workdir / "passwd").read_text().rstrip().endswith(":/run/sshd:/bin/false")
        assert "root:*:" in (workdir / "shadow").read_text() and "root:!:" in locked.read_text()
        r = ssh(workdir, emu.hosts[1].ip, f"echo $CUDA_VISIBLE_DEVICES $NCCL_HOSTID; hostname; "
                f"cat {shared}/site/marker; setsid sh -c 'echo $CUDA_VISIBLE_DEVICES' </dev/null")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["2,3", "rig-h1", "gpu-host-1", "stack", "2,3"]  # a daemon it starts has it too
        r = ssh(workdir, emu.hosts[2].ip, "echo $CUDA_VISIBLE_DEVICES ${NCCL_HOSTID:-none}; hostname")
        assert r.stdout.split() == ["0", "none", subprocess.run(["hostname"], capture_output=True,
                                                               text=True).stdout.strip()]
    finally:
        emu.teardown()
        subprocess.run(["rm", "-rf", str(workdir), str(shared)], check=False)
