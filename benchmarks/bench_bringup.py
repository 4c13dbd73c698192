"""Bring-up time of a Ray cluster on 1..N emulated hosts: fleetserve up vs Ray's own ``ray up``.

Each size gets fresh emulated hosts (tests/hosts/emulation.py: netns + sshd + PID
namespace per host, logical GPUs). Measured per size:

* ``fleetserve up``: connect + preflight + start + wait-until-joined (wall time),
  with the phase split from its progress lines, then ``fleetserve down``;
* ``ray up`` (Ray's cluster launcher, local provider, same hosts, same
  ``ray start`` flags): until ``ray up`` returns (head ready) and until every
  worker has joined (the launcher's autoscaler starts workers from the head),
  then ``ray down``. Where it cannot run here, the reason is recorded.

Ray's default autoscaler on the ``ray up`` head (v2 in Ray 2.58) counts the head
among the local node type's nodes, so it starts one listed worker fewer than
asked, one at a time; ``all_joined_s`` is null where not every listed worker
joined within ``--timeout`` (``autoscaler_log_tail`` shows why).
``--ray-autoscaler v1`` (``RAY_enable_autoscaler_v2=0``) starts them all.

Writes benchmarks/results/bringup.json and bringup.png. Needs root.
    .venv/bin/python benchmarks/bench_bringup.py --max-hosts 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from hosts.emulation import VENV, HostEmulator, missing_requirements  # noqa: E402
from provenance import provenance  # noqa: E402

from cluster.fleet.hostfile import load_hostfile  # noqa: E402
from cluster.commands.cluster_cmds import open_cluster  # noqa: E402
from cluster.fleet.bringup import RayCluster  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
WORKDIR = Path("/tmp/fleetserve-hosts-bench")


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def wait_joined(rc: RayCluster, n: int, timeout: float) -> float | None:
    """Seconds until n nodes are alive (polled via the head), None on timeout."""
    t0 = time.monotonic()
    ips = [h.ray_ip for h in rc.config.hosts[:n]]
    try:
        state = rc.head_query(wait_for=ips, timeout=timeout)
    except Exception:  # noqa: BLE001 - the head may not be up at all
        return None
    alive = {x["ip"] for x in state["nodes"] if x["alive"]}
    return time.monotonic() - t0 if set(ips) <= alive else None


def bench_fleetserve(emu: HostEmulator, n: int) -> dict:
    hf = emu.hostfile(list(range(1, n + 1)), path=WORKDIR / f"hostfile-{n}")
    config = load_hostfile(hf)
    marks: dict[str, float] = {}
    with open_cluster(config, state_dir=WORKDIR / "state") as rc:  # never the operator's own record
        t0 = time.monotonic()
        summary = rc.up()
        total = time.monotonic() - t0
        t1 = time.monotonic()
        rc.down()
        down = time.monotonic() - t1
    marks["up_s"] = round(total, 2)
    marks["down_s"] = round(down, 2)
    marks["started"] = len(summary["started"])
    return marks


def ray_up_config(emu: HostEmulator, n: int, autoscaler: str = "default") -> dict:
    ray = str(VENV / "ray")
    # Ray 2.58's default autoscaler (v2) counts the head among the local provider's one node type
    # and so starts one worker fewer than listed; "v1" runs the head with the older autoscaler.
    head_env = "RAY_enable_autoscaler_v2=0 " if autoscaler == "v1" else ""
    common = "--num-gpus=2 --num-cpus=4 --temp-dir=/run/fleetserve-ray --object-store-memory=104857600 --disable-usage-stats"
    head = emu.hosts[1]
    return {
        "cluster_name": f"fsbench{n}",
        "provider": {"type": "local", "head_ip": head.ip, "worker_ips": [emu.hosts[i].ip for i in range(2, n + 1)]},
        "auth": {"ssh_user": "root", "ssh_private_key": str(emu.client_key)},
        "min_workers": n - 1, "max_workers": n - 1, "upscaling_speed": 10.0, "idle_timeout_minutes": 5,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [f"{ray} stop", f"mkdir -p /run/fleetserve-ray && ulimit -n 65536; {head_env}{ray} start --head "
                                    f"--port=6379 --node-ip-address={head.ip} "
                                    f"--autoscaling-config=~/ray_bootstrap_config.yaml {common}"],
        "worker_start_ray_commands": [f"{ray} stop", f"mkdir -p /run/fleetserve-ray && ulimit -n 65536; {ray} start "
                                      f"--address=$RAY_HEAD_IP:6379 {common}"],
    }


def bench_ray_up(emu: HostEmulator, n: int, timeout: float, autoscaler: str = "default") -> dict:
    cfg_path = WORKDIR / f"ray-up-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(ray_up_config(emu, n, autoscaler)))
    env = {**os.environ, "PATH": f"{VENV}:{os.environ['PATH']}"}
    out: dict = {}
    t0 = time.monotonic()
    r = subprocess.run([str(VENV / "ray"), "up", "-y", "--no-config-cache", str(cfg_path)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    out["ray_up_returned_s"] = round(time.monotonic() - t0, 2)
    (WORKDIR / f"ray-up-{n}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        out["error"] = (r.stdout + r.stderr).strip().splitlines()[-5:]
    else:
        hf = emu.hostfile(list(range(1, n + 1)), path=WORKDIR / f"hostfile-{n}")
        with RayCluster(load_hostfile(hf)) as rc:
            joined = wait_joined(rc, n, timeout)
            if joined is None:
                # The launcher's autoscaler on the head starts the workers: its log says why they did not join.
                log = rc.pool.run(rc.head, "tail -n 25 /run/fleetserve-ray/session_latest/logs/monitor.log "
                                  "/run/fleetserve-ray/session_latest/logs/monitor.err 2>&1", timeout=60)
                out["autoscaler_log_tail"] = log.stdout.strip().splitlines()[-25:]
        out["all_joined_s"] = round(time.monotonic() - t0, 2) if joined is not None else None
    t1 = time.monotonic()
    d = subprocess.run([str(VENV / "ray"), "down", "-y", str(cfg_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    out["ray_down_s"] = round(time.monotonic() - t1, 2)
    if d.returncode != 0:
        out["down_error"] = (d.stdout + d.stderr).strip().splitlines()[-3:]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["runs"]
    ns = [r["hosts"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ns, [r["fleetserve"]["up_s"] for r in rows], "o-", label="fleetserve up (preflight + start + all joined)")
    ru = [r.get("ray_up", {}) for r in rows]
    if any(x.get("all_joined_s") for x in ru):
        ax.plot(ns, [x.get("ray_up_returned_s") for x in ru], "s--", label="ray up (returns: head ready)")
        ax.plot(ns, [x.get("all_joined_s") for x in ru], "^-", label="ray up (all workers joined)")
    ax.set_xlabel("emulated hosts")
    ax.set_ylabel("seconds")
    ax.set_xticks(ns)
    ax.set_title(f"Ray cluster bring-up on emulated hosts ({results['machine']['cpus']} cores, load ~{results['machine']['load_start']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-hosts", type=int, default=4)
    parser.add_argument("--no-ray-up", action="store_true")
    parser.add_argument("--sizes", help="comma-separated host counts instead of 1..--max-hosts")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--ray-autoscaler", choices=["default", "v1"], default="default",
                        help="autoscaler on the ray up head (v1: RAY_enable_autoscaler_v2=0)")
    parser.add_argument("--out", default="bringup", help="results name under benchmarks/results/")
    args = parser.parse_args()
    why = missing_requirements()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    ray_up_note = None
    if args.no_ray_up:
        ray_up_note = "skipped (--no-ray-up)"
    elif shutil.which("rsync") is None:
        ray_up_note = "ray up needs rsync on the client (not installed here)"
    results: dict = {
        **provenance(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": loadavg(),
                    "note": "2-core VM shared with other jobs: absolute times are load-dependent; compare columns"},
        "method": "fresh emulated hosts per size; slots=2 logical GPUs, num_cpus=4; wall time of one bring-up each",
        "runs": [],
    }
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else range(1, args.max_hosts + 1)
    for n in sizes:
        emu = HostEmulator(WORKDIR)
        try:
            emu.teardown()
            emu.setup()
            for i in range(1, n + 1):
                emu.add_host(i)
            row: dict = {"hosts": n, "load": loadavg()}
            row["fleetserve"] = bench_fleetserve(emu, n)
            print(f"{n} host(s): fleetserve {row['fleetserve']}", flush=True)
            if ray_up_note is None:
                try:
                    row["ray_up"] = bench_ray_up(emu, n, args.timeout, args.ray_autoscaler)
                except subprocess.TimeoutExpired as exc:
                    row["ray_up"] = {"error": f"timed out after {exc.timeout}s"}
                print(f"{n} host(s): ray up {row['ray_up']}", flush=True)
            results["runs"].append(row)
        finally:
            emu.teardown()
    results["ray_up"] = ray_up_note or ("Ray cluster launcher, provider: local, same hosts and ray start flags, "
                                        f"autoscaler on the head: {args.ray_autoscaler}")
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / f"{args.out}.png")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
