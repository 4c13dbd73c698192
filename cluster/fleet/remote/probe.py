"""Preflight probe, run on every host: Python, package versions, GPUs, /dev/shm, ports, routes, Ray processes.

Only the standard library: it runs before anything says the host's Python is usable.
Prints one JSON object (parsed by :class:`cluster.fleet.preflight.Probe`).
"""

import json
import os
import platform
import shutil
import socket
import subprocess
import sys


def package_versions(packages: dict[str, list[str]]) -> dict[str, str]:
    """Installed version per package name; the first distribution found of its alternatives."""
    from importlib import metadata

    found = {}
    for name, dists in packages.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def busy_ports(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
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
    return busy


def ipv4_addresses() -> dict[str, str]:
    """Address -> interface name."""
    addrs = {}
    try:
        r = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
        for line in r.stdout.splitlines():
            parts = line.split()
            if "inet" in parts:
                addrs[parts[parts.index("inet") + 1].split("/")[0]] = parts[1].split("@")[0]
    except Exception:
        pass
    return addrs


def ray_pids(start_pidfile: str | None) -> list[int]:
    """Ray's daemons here, and what is left of a `ray start` of this cluster (its session, from the pid file)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    if fh.read().strip() in ("raylet", "gcs_server"):
                        pids.append(int(pid))
            except OSError:
                pass
    if start_pidfile:
        try:
            with open(os.path.expanduser(start_pidfile)) as fh:
                pgid = int(fh.read().strip())
            for pid in os.listdir("/proc"):
                if pid.isdigit() and os.getpgid(int(pid)) == pgid:
                    pids.append(int(pid))
        except (OSError, ValueError):
            pass
    return sorted(set(pids))


def visible_gpus(rows: list[tuple[str, str, str]], cuda_visible_devices: str | None) -> list[str]:
    """Names of the GPUs a process here may use: nvidia-smi's ``(index, uuid, name)`` rows, narrowed as CUDA does.

    nvidia-smi lists every GPU of the machine; ``CUDA_VISIBLE_DEVICES`` in the
    host's environment (a host that owns some of a machine's GPUs) narrows what
    Ray and vLLM there see, so preflight must count those. Entries are indices
    or (prefixes of) UUIDs; CUDA ignores everything from the first entry that
    names no GPU on.
    """
    if cuda_visible_devices is None:
        return [name for _, _, name in rows]
    chosen = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        match = [r for r in rows if entry and (r[0] == entry or (entry.startswith("GPU-") and r[1].startswith(entry)))]
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return [name for _, _, name in chosen]


def main() -> None:
    args = json.loads(sys.argv[1])
    out = {"python": platform.python_version(), "executable": sys.executable,
           "hostname": socket.gethostname(), "packages": {}}
    try:
        out["packages"] = package_versions(args["packages"])
    except Exception as exc:
        out["packages_error"] = repr(exc)
    out["gpus"] = None
    if shutil.which("nvidia-smi"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            rows = [tuple(part.strip() for part in line.split(",", 2)) for line in r.stdout.splitlines()
                    if line.count(",") >= 2]
            out["gpus"] = visible_gpus(rows, os.environ.get("CUDA_VISIBLE_DEVICES")) if r.returncode == 0 else None
            out["gpus_on_machine"] = len(rows) if r.returncode == 0 else None
            if r.returncode != 0:
                out["gpu_error"] = (r.stderr or r.stdout).strip()[-300:]
        except Exception as exc:
            out["gpu_error"] = repr(exc)
    try:
        st = os.statvfs("/dev/shm")
        out["shm_bytes"] = st.f_blocks * st.f_frsize
    except OSError:
        out["shm_bytes"] = 0
    out["busy_ports"] = busy_ports(args["ports"])
    addrs = ipv4_addresses()
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
    out["ray_pids"] = ray_pids(args.get("start_pidfile"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
