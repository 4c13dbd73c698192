"""Two hosts on one GPU machine: a pipeline-parallel replica whose stages sit on two emulated hosts (issue 13).

On one machine with N GPUs (2 or 4 lent; any even N works), two hosts are
emulated as the CPU tests do (tests/hosts/emulation.py: network, PID, mount
and UTS namespaces on a bridge, one sshd each), each owning N/2 GPUs through its
own login environment (``CUDA_VISIBLE_DEVICES``) and a distinct
``NCCL_HOSTID``, so NCCL treats them as two nodes. Then, as an operator would:

* ``up``     -- write the hostfile, ``fleetserve up`` over SSH; check preflight
  picked the bridge-side interface (``eth0`` in each host) for NCCL/GLOO and
  each host's own address as ``VLLM_HOST_IP``, saw N/2 GPUs per host, and that a
  Ray task on each node sees that host's GPUs, name and env (read back in Ray).
* ``serve``  -- ``fleetserve serve deployments/qwen25_vl.yaml --detach --set
  tensor_parallel_size=N/2 --set pipeline_parallel_size=2`` (dummy weights,
  FlagGems per ``--flaggems``), ready when /health says 200.
* ``place``  -- from Ray's actor table: each PP stage's vLLM workers sit on a host
  of their own.
* ``chat``   -- a text and an image chat answer.
* ``gems``   -- (``--flaggems on``) the per-op FlagGems report of every worker
  process, grouped by host: both hosts present, every process active.
* ``bench``  -- ``vllm bench serve`` (c = 1, 16, 64; random and random-mm).
* ``fault``  -- the second host's raylet killed under load: every client answer
  is a 200, a 503 with Retry-After, or a cut stream -- never a hang;
  ``fleetserve up`` brings the host back; time to serving again.
* ``single`` -- after the emulated cluster is gone: the same TP x PP on one host
  (``fleetserve serve`` on a local head, no emulation) and the same loads, for
  the cross-host ratio.

NCCL runs with ``NCCL_DEBUG=INFO`` into per-process files; the transports each
run used are parsed from them. Every phase has a deadline inside ``--deadline-s``
and the JSON (commit and device from benchmarks/provenance.py) is rewritten after
each phase, so one device call (< 10 min) runs a subset (``--phases``) and
still leaves what it measured. ``report`` (here) merges the JSONs of several
calls into benchmarks/results/ with a plot.

``--cpu-dry-run`` (CPU, root, under the heavy-test lock) runs the ``up`` phase
with logical GPUs -- no vLLM -- to check the bootstrap, the per-host env and the
GPU readback before device time is spent.

    # GPU machine (stack staged, .rig-debs carried): benchmarks/gpu/run_two_host_rig.sh PHASES [flags]
    python3 benchmarks/gpu/two_host_rig.py run --phases up,serve,place,chat,bench --out $OUT/rig.json
    # here
    python3 benchmarks/gpu/two_host_rig.py report run1/rig.json run2/rig.json --name two_host_rig_qwen25vl32b
    # a run that recorded another commit than the one it ran (a stale .git), named by its file's stem
    python3 benchmarks/gpu/two_host_rig.py report ... --run-commit rig-single=SHA
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import command_line, provenance, utc_now  # noqa: E402
from waiting import stop_like_ctrl_c  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FILE = ROOT / "deployments" / "qwen25_vl.yaml"
PORT = 9010  # the file's http_options.port
WORKDIR = Path("/tmp/fleetserve-rig")
HOSTS = 2
PHASES = ("up", "serve", "place", "chat", "gems", "bench", "fault", "single")
#: Phases that need the emulated cluster, and those that need the model served on it.
ON_CLUSTER = {"up", "serve", "place", "chat", "gems", "bench", "fault"}
ON_SERVE = {"place", "chat", "gems", "bench", "fault"}
#: (dataset, concurrency, prompts): random = 512 in / 128 out; random-mm = 2 images 448x448 + 128 in / 128 out.
LOADS = [("random", 1, 8), ("random", 16, 64), ("random", 64, 192),
         ("random-mm", 1, 8), ("random-mm", 16, 64), ("random-mm", 64, 128)]
#: NVLink multicast off in every environment the rig builds (device README: it can take the host's GPUs down).
SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: What of the rig's own environment every emulated host's login environment gets (the same machine image):
#: the stack's paths and the GPU/NCCL/vLLM settings -- never what names one host (set per host below).
INHERITED_KEYS = {"PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "HOME", "LANG", "LC_ALL", "TZ",
                  "DO_NOT_TRACK"}
INHERITED_PREFIXES = ("CUDA_", "NVIDIA_", "NCCL_", "TORCH_", "NVSHMEM_", "VLLM_", "HF_", "TRANSFORMERS_", "TRITON_",
                      "FLAGGEMS_", "GEMS_", "RAY_USAGE_STATS_")
PER_HOST_KEYS = {"CUDA_VISIBLE_DEVICES", "NCCL_HOSTID", "NCCL_DEBUG_FILE"}


# ----------------------------------------------------------------------------------------- pure parts


def split_gpus(total: int, hosts: int = HOSTS) -> list[list[int]]:
    """The machine's GPU indices split evenly and in order over ``hosts`` (2 -> [[0], [1]], 4 -> [[0, 1], [2, 3]])."""
    if total < hosts or total % hosts:
        raise ValueError(f"{total} GPU(s) cannot be split evenly over {hosts} hosts (need a multiple of {hosts})")
    per = total // hosts
    return [list(range(i * per, (i + 1) * per)) for i in range(hosts)]


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` every emulated host's login environment starts from, NVLink multicast forced off.

    Values sshd's ``SetEnv`` cannot carry (a '"', a '\\\\' or a line break) are left out.
    """
    env = {k: v for k, v in environ.items()
           if (k in INHERITED_KEYS or k.startswith(INHERITED_PREFIXES)) and k not in PER_HOST_KEYS
           and not any(c in v for c in '"\\\n\r')}
    return {**env, **SAFETY_ENV}


def host_env(index: int, gpus: list[int], base: Mapping[str, str]) -> dict[str, str]:
    """Host ``index``'s (1-based) login environment: ``base`` plus its own GPUs and NCCL host identity."""
    return {**base, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "NCCL_HOSTID": f"fleetserve-rig-h{index}",
            **SAFETY_ENV}


def cluster_settings(workdir: Path, python: str, ray_cli: str, cpus: int, gpu: bool) -> dict[str, str]:
    """The hostfile's ``[cluster]`` settings beyond the emulator's defaults (tests/hosts/emulation.py).

    NCCL logs INFO into one file per process (``%h`` host, ``%p`` pid) in the
    shared work directory, where the rig reads the transports back.
    """
    settings = {
        "name": "rig", "ray.python": python, "ray.ray": ray_cli, "ray.num_cpus": str(cpus),
        "ray.join_timeout": "120",
        "env.NCCL_DEBUG": "INFO", "env.NCCL_DEBUG_SUBSYS": "INIT,NET,ENV",
        "env.NCCL_DEBUG_FILE": str(workdir / "nccl" / "emulated.%h.%p.log"),
        "env.HF_HUB_OFFLINE": "1", "env.TRANSFORMERS_OFFLINE": "1", "env.VLLM_USE_FLASHINFER_SAMPLER": "0",
        **{f"env.{k}": v for k, v in SAFETY_ENV.items()},
    }
    if gpu:  # vLLM's workers move tensors through the object store and /dev/shm
        settings.update({"ray.object_store_memory": str(4 << 30), "ray.min_shm_bytes": str(1 << 30)})
    return settings


_VIA = re.compile(r"\bvia (\S+)")
_NETWORK = re.compile(r"NCCL INFO Using network (\S+)")
_SOCKET_IF = re.compile(r"NCCL INFO NET/(\w+) : Using (.+?)\s*$")
_NNODES = re.compile(r"\bnNodes (\d+)")
_HOST = re.compile(r"^([^\s:]+):\d+:\d+ ")


def transport_name(via: str) -> str:
    """``NET/Socket/0`` -> ``NET/Socket``, ``P2P/CUMEM/read`` -> ``P2P/CUMEM``, ``SHM/direct/direct`` -> ``SHM``."""
    parts = via.split("/")
    return "/".join(parts[:2]) if parts[0] in ("NET", "P2P", "COLLNET") and len(parts) > 1 else parts[0]


def nccl_summary(lines: Iterable[str]) -> dict[str, Any]:
    """What NCCL_DEBUG=INFO lines say: transports per connection, network plugin, interfaces, nodes, hosts."""
    transports: Counter[str] = Counter()
    networks, interfaces, nnodes, hosts = set(), set(), set(), set()
    count = 0
    for line in lines:
        if "NCCL INFO" not in line:
            continue
        count += 1
        if m := _HOST.match(line):
            hosts.add(m.group(1))
        if "Channel" in line and (m := _VIA.search(line)):
            transports[transport_name(m.group(1))] += 1
        if m := _NETWORK.search(line):
            networks.add(m.group(1))
        if m := _SOCKET_IF.search(line):
            interfaces.add(f"{m.group(1)}: {m.group(2)}")
        if m := _NNODES.search(line):
            nnodes.add(int(m.group(1)))
    return {"info_lines": count, "transports": dict(sorted(transports.items())), "networks": sorted(networks),
            "interfaces": sorted(interfaces), "nnodes": sorted(nnodes), "hosts": sorted(hosts)}


_STAGE = re.compile(r"_PP(\d+)(?:_|$)")
_TP = re.compile(r"_TP(\d+)(?:_|$)")


def stage_hosts(state: Mapping[str, Any], pp: int) -> dict[int, list[str]]:
    """Pipeline stage -> the node IPs its vLLM workers run on, from the ``actors`` readback (rig_head.py).

    vLLM's Ray executor names each worker ``vllm_Worker_<id>[_TP<t>][_PP<p>]``
    (vllm.v1.executor.ray_utils.build_actor_name); without ``_PP`` (pp = 1) all
    workers are stage 0.
    """
    nodes = state["nodes"]
    stages: dict[int, set[str]] = {}
    for actor in state["actors"]:
        if not actor["name"].startswith("vllm_Worker_"):
            continue
        m = _STAGE.search(actor["name"])
        if m is None and pp > 1:
            continue
        stage = int(m.group(1)) if m else 0
        stages.setdefault(stage, set()).add(nodes.get(actor["node_id"], actor["node_id"]))
    return {s: sorted(ips) for s, ips in sorted(stages.items())}


def placement_problems(stages: Mapping[int, list[str]], pp: int) -> list[str]:
    """Each of the ``pp`` stages on exactly one host, no host holding two stages."""
    problems = []
    if sorted(stages) != list(range(pp)):
        problems.append(f"vLLM workers found for stages {sorted(stages)}, expected 0..{pp - 1}")
    for stage, ips in stages.items():
        if len(ips) != 1:
            problems.append(f"stage {stage} spans {len(ips)} hosts: {ips}")
    owners = Counter(ip for ips in stages.values() for ip in ips)
    problems += [f"host {ip} holds {n} stages" for ip, n in owners.items() if n > 1]
    return problems


def up_problems(summary: Mapping[str, Any], expected: Mapping[str, int | None], iface: str = "eth0") -> list[str]:
    """``fleetserve up --json``: every host's preflight chose ``iface`` and saw its own GPUs (None: no nvidia-smi)."""
    problems = []
    for ip, want in expected.items():
        host = summary["hosts"].get(ip)
        if host is None:
            problems.append(f"{ip}: not in the summary")
            continue
        if host.get("iface") != iface:
            problems.append(f"{ip}: preflight picked interface {host.get('iface')!r}, not {iface!r}")
        gpus = host.get("gpus")
        if want is not None and (gpus is None or len(gpus) != want):
            problems.append(f"{ip}: preflight saw {gpus!r}, expected {want} GPU(s)")
    return problems


def ray_gpu_problems(readback: Mapping[str, Any], hosts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ``gpus`` readback against what each host should be: its GPUs, name, NCCL identity, interface.

    ``hosts``: node IP -> ``{"gpus": [indices], "hostname", "nccl_hostid", "iface"}``.
    """
    problems = []
    by_ip = {n["ip"]: n for n in readback["nodes"]}
    for ip, want in hosts.items():
        node = by_ip.get(ip)
        if node is None:
            problems.append(f"{ip}: no alive Ray node")
            continue
        if node["gpus"] != len(want["gpus"]):
            problems.append(f"{ip}: Ray offers {node['gpus']} GPU(s), expected {len(want['gpus'])}")
        task = node.get("task")
        if task is None:
            problems.append(f"{ip}: {node.get('task_error', 'no GPU task ran')}")
            continue
        seen = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, want["gpus"])), "NCCL_HOSTID": want["nccl_hostid"],
                "NCCL_SOCKET_IFNAME": want["iface"], "VLLM_HOST_IP": ip, **SAFETY_ENV}
        for key, value in seen.items():
            if task["env"].get(key) != value:
                problems.append(f"{ip}: a Ray task there sees {key}={task['env'].get(key)!r}, expected {value!r}")
        if task["hostname"] != want["hostname"]:
            problems.append(f"{ip}: a Ray task there runs on host {task['hostname']!r}, expected {want['hostname']!r}")
        if "cuda_devices" in task and len(task["cuda_devices"]) != len(want["gpus"]):
            problems.append(f"{ip}: torch sees {len(task['cuda_devices'])} CUDA device(s) there, expected "
                            f"{len(want['gpus'])}")
    uuids = [u for n in readback["nodes"] for u in (n.get("task") or {}).get("cuda_devices", [])]
    if len(uuids) != len(set(uuids)):
        problems.append(f"one GPU is seen by two hosts: {uuids}")
    return problems


def gems_by_host(health: Mapping[str, Any], served: str) -> dict[str, Any]:
    """/health's FlagGems report of one model, per host: each process's status and per-op results."""
    gems = health["models"][served]["flaggems"]
    hosts: dict[str, list[dict[str, Any]]] = {}
    for rep in gems["processes"]:
        hosts.setdefault(rep.get("hostname", "?"), []).append({
            "pid": rep.get("pid"), "process": rep.get("process"), "status": rep.get("status"),
            "ops": {op: res.get("status") for op, res in rep.get("ops", {}).items()},
            "kernels_loaded": rep.get("kernels_loaded")})
    return {"summary": gems["summary"], "hosts": hosts}


def gems_problems(report: Mapping[str, Any], hostnames: list[str]) -> list[str]:
    problems = [f"no FlagGems report from a process on {h}" for h in hostnames if h not in report["hosts"]]
    if report["summary"].get("failed"):
        problems.append(f"ops failed: {report['summary']['failed']}")
    problems += [f"{h} pid {p['pid']}: status {p['status']}" for h, procs in report["hosts"].items()
                 for p in procs if p["status"] != "active"]
    return problems


def load_names(loads: str) -> list[tuple[str, int, int]]:
    """``--loads`` (comma list of ``dataset_cN``, empty: all) -> entries of :data:`LOADS`."""
    if not loads:
        return list(LOADS)
    wanted = loads.split(",")
    known = {f"{d}_c{c}": (d, c, n) for d, c, n in LOADS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"unknown load(s) {unknown}; known: {sorted(known)}")
    return [known[w] for w in wanted]


def parse_phases(text: str, cpu_dry_run: bool) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; phases: {','.join(PHASES)}")
    if cpu_dry_run and set(phases) - {"up"}:
        raise ValueError("--cpu-dry-run runs only the 'up' phase (no vLLM on logical GPUs)")
    if set(phases) & ON_SERVE and "serve" not in phases:
        phases.insert(phases.index("up") + 1 if "up" in phases else 0, "serve")
    if set(phases) & ON_CLUSTER and "up" not in phases:
        phases.insert(0, "up")
    return sorted(phases, key=PHASES.index)


# ----------------------------------------------------------------------------------------- the run


class Run:
    """One call's phases, deadlines and partial JSON."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t_end = time.monotonic() + args.deadline_s
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(args.workdir)
        self.result: dict[str, Any] = {**provenance(), "phases_asked": args.phases, "phases": {}}
        self.emu = None
        self.hostfile: Path | None = None
        self.failed: set[str] = set()

    def left(self) -> float:
        return self.t_end - time.monotonic()

    def write(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)

    def phase(self, name: str, need_s: float, fn: Callable[[], dict[str, Any]],
              needs: Iterable[str] = ()) -> bool:
        """Run one phase if its prerequisites held and ``need_s`` seconds are left; record and write."""
        blocked = [n for n in needs if n in self.failed]
        if blocked or self.left() < need_s:
            why = f"{blocked[0]} failed" if blocked else f"{self.left():.0f}s left, needs {need_s:.0f}s"
            self.result["phases"][name] = {"ok": False, "skipped": why}
            self.failed.add(name)
            self.write()
            print(f"[rig] {name}: skipped ({why})", flush=True)
            return False
        print(f"[rig] {name}: start ({self.left():.0f}s left)", flush=True)
        t0 = time.monotonic()
        try:
            record = fn()
            record["ok"] = not record.get("problems")
        except Exception as exc:
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        record["seconds"] = round(time.monotonic() - t0, 1)
        self.result["phases"][name] = record
        if not record["ok"]:
            self.failed.add(name)
        self.write()
        print(f"[rig] {name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']}s "
              f"{record.get('problems') or record.get('error') or ''}", flush=True)
        return record["ok"]

    # ------------------------------------------------------------------ set-up
    def gpu_count(self) -> int:
        if self.args.gpus:
            return self.args.gpus
        if self.args.cpu_dry_run:
            return HOSTS
        r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60, check=True)
        return len(r.stdout.split())

    def configure(self) -> None:
        total = self.gpu_count()
        self.split = split_gpus(total)
        self.tp, self.pp = len(self.split[0]), HOSTS
        self.model_dir = Path(self.args.model_dir or f"/tmp/models/qwen2_5_vl_{self.args.model_size}")
        self.served = f"Qwen2.5-VL-{self.args.model_size.upper()}-Instruct"
        self.result.update({"gpus": total, "split": self.split, "tensor_parallel_size": self.tp,
                            "pipeline_parallel_size": self.pp, "model_size": self.args.model_size,
                            "flaggems": self.args.flaggems, "cpu_dry_run": self.args.cpu_dry_run})
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "nccl").mkdir(exist_ok=True)
        self.key_file = self.workdir / "api-keys"
        if not self.key_file.exists():
            self.key_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.key_file.chmod(0o600)
        self.key = self.key_file.read_text().split()[0]
        self.state = self.workdir / "state"

    def cli(self, *args: str, timeout: float, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        full = {**os.environ, "FLEETSERVE_STATE_DIR": str(self.state), "COLUMNS": "200", **SAFETY_ENV, **(env or {})}
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=max(1.0, timeout), env=full)

    def ray_cli(self) -> str:
        """The ``ray`` CLI for the hosts: the venv's, else a wrapper (a stack on PYTHONPATH has no console scripts)."""
        venv_ray = Path(sys.executable).parent / "ray"
        if venv_ray.exists():
            return str(venv_ray)
        wrapper = self.workdir / "ray"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m ray.scripts.scripts \"$@\"\n")
        wrapper.chmod(0o755)
        return str(wrapper)

    def shared_paths(self) -> list[Path]:
        """What the hosts must see in their private /tmp: the repo, the model, the stack, the tools."""
        paths = [ROOT, self.model_dir]
        for var in ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH"):
            paths += [Path(p) for p in os.environ.get(var, "").split(":") if p.startswith("/tmp/")]
        if os.environ.get("FLEETSERVE_TOOLS_PREFIX"):  # rig-tools.sh: the wrappers, binaries and libraries
            paths.append(Path(os.environ["FLEETSERVE_TOOLS_PREFIX"]))
        return paths

    def expected_hosts(self) -> dict[str, dict[str, Any]]:
        return {h.ip: {"gpus": self.split[i - 1], "hostname": f"fs-h{i}", "nccl_hostid": f"fleetserve-rig-h{i}",
                       "iface": "eth0"} for i, h in sorted(self.emu.hosts.items())}

    # ------------------------------------------------------------------ phases
    def up(self) -> dict[str, Any]:
        from hosts.emulation import HostEmulator, missing_requirements

        why = missing_requirements()
        if why:
            raise RuntimeError(f"cannot emulate hosts here: {why}")
        if not self.args.cpu_dry_run and not (self.model_dir / "config.json").exists():
            r = subprocess.run([sys.executable, "-m", "cluster.cli", "make-model", "--arch", "qwen2_5_vl", "--size",
                                self.args.model_size, "--out", str(self.model_dir)], cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"make-model failed: {r.stderr[-2000:]}")
        self.emu = HostEmulator(self.workdir, shared_paths=self.shared_paths())
        self.emu.teardown()  # leftovers of an earlier call on this machine
        self.emu.setup()
        base = inherited_env(os.environ)
        for i, gpus in enumerate(self.split, start=1):
            # Ray's temp dir (logs, spilled objects) is in the host's /run; tmpfs takes memory only as used.
            self.emu.add_host(i, env=host_env(i, gpus, base), hostname=f"fs-h{i}",
                              **({} if self.args.cpu_dry_run else {"shm_size": "32g", "run_size": "16g",
                                                                     "tmp_size": "8g"}))
        cpus = 4 if self.args.cpu_dry_run else max(8, (os.cpu_count() or 16) // HOSTS)
        self.hostfile = self.emu.hostfile(
            slots=self.tp, path=self.workdir / "hostfile",
            settings=cluster_settings(self.workdir, sys.executable, self.ray_cli(), cpus, not self.args.cpu_dry_run))
        t0 = time.monotonic()
        r = self.cli("up", str(self.hostfile), "--json", timeout=min(self.left(), 300))
        seconds_up = round(time.monotonic() - t0, 1)
        if r.returncode != 0:
            raise RuntimeError(f"fleetserve up failed ({r.returncode}): {(r.stdout + r.stderr)[-3000:]}")
        summary = json.loads(r.stdout)
        want_gpus = {ip: (None if self.args.cpu_dry_run else len(h["gpus"])) for ip, h in self.expected_hosts().items()}
        problems = up_problems(summary, want_gpus)
        from cluster.fleet.bringup import RayCluster
        from cluster.fleet.hostfile import load_hostfile
        import rig_head

        with RayCluster(load_hostfile(self.hostfile), state_dir=self.state) as rc:
            readback = rc.run_on_head(rig_head, {"mode": "gpus", "timeout": 120}, timeout=150)
        problems += ray_gpu_problems(readback, self.expected_hosts())
        return {"hostfile": self.hostfile.read_text(), "seconds_up": seconds_up,
                "preflight": {ip: {k: h.get(k) for k in ("iface", "gpus", "slots")} for ip, h in summary["hosts"].items()},
                "ray_readback": readback, "problems": problems}

    def overrides(self) -> list[str]:
        sets = [f"model.source={self.model_dir}", f"model.served_name={self.served}",
                f"tensor_parallel_size={self.tp}", f"pipeline_parallel_size={self.pp}", "model.load_format=dummy",
                "accelerator_type=null", f"flaggems.enabled={'true' if self.args.flaggems == 'on' else 'false'}",
                *self.args.set]
        return [a for s in sets for a in ("--set", s)]

    def serve_env(self) -> dict[str, str]:
        return {"FLEETSERVE_API_KEYS_FILE": str(self.key_file), "OPENAI_API_KEY": self.key}

    @property
    def base(self) -> str:
        return f"http://{self.emu.hosts[1].ip}:{PORT}"

    def serve(self) -> dict[str, Any]:
        shutil_rmtree(Path.home() / ".cache" / "vllm")  # a cold start, like serve_vs_plain.py
        budget = self.left() - 20
        t0 = time.monotonic()
        r = self.cli("serve", str(FILE), "--detach", "--ready-timeout", str(int(budget)), *self.overrides(),
                     timeout=budget + 15, env=self.serve_env())
        ready = round(time.monotonic() - t0, 1)
        out = {"command": f"fleetserve serve {FILE.relative_to(ROOT)} --detach {' '.join(self.overrides())}",
               "ready_s": ready, "output": (r.stdout + r.stderr)[-2000:]}
        if r.returncode != 0:
            out["problems"] = [f"fleetserve serve exited {r.returncode}"]
        return out

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def place(self) -> dict[str, Any]:
        from cluster.fleet.bringup import RayCluster
        from cluster.fleet.hostfile import load_hostfile
        import rig_head

        with RayCluster(load_hostfile(self.hostfile), state_dir=self.state) as rc:
            state = rc.run_on_head(rig_head, {"mode": "actors"}, timeout=60)
        stages = stage_hosts(state, self.pp)
        workers = [a for a in state["actors"] if a["name"].startswith("vllm_Worker_")]
        return {"stages": {str(s): ips for s, ips in stages.items()}, "workers": workers,
                "problems": placement_problems(stages, self.pp)}

    def chat(self) -> dict[str, Any]:
        import httpx

        def ask(content: object) -> dict[str, Any]:
            t0 = time.monotonic()
            r = httpx.post(f"{self.base}/v1/chat/completions", headers=self.headers(), timeout=min(300, self.left()),
                           json={"model": self.served, "max_tokens": 16, "messages": [{"role": "user", "content": content}]})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return {"status": r.status_code, "seconds": round(time.monotonic() - t0, 2), "usage": body.get("usage"),
                    "text": ((body.get("choices") or [{}])[0].get("message") or {}).get("content", r.text[:300])}

        text = ask("Say hello in one word.")
        image = ask([{"type": "text", "text": "What colour is this?"},
                     {"type": "image_url", "image_url": {"url": png_data_url()}}])
        problems = [f"{k} chat answered {v['status']}" for k, v in (("text", text), ("image", image))
                    if v["status"] != 200]
        if image["status"] == 200 and (image["usage"] or {}).get("prompt_tokens", 0) <= 64:
            problems.append(f"image chat's prompt holds {image['usage']} tokens: the image did not reach the model")
        return {"text": text, "image": image, "problems": problems}

    def gems(self) -> dict[str, Any]:
        import httpx

        if self.args.flaggems != "on":
            return {"problems": ["--flaggems off: nothing to report (run the gems phase with --flaggems on)"]}
        health = httpx.get(f"{self.base}/health", headers=self.headers(), timeout=30).json()
        report = gems_by_host(health, self.served)
        return {**report, "problems": gems_problems(report, [f"fs-h{i}" for i in self.emu.hosts])}

    def bench(self, base: str) -> dict[str, Any]:
        from vllm_bench import bench_serve

        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for dataset, concurrency, prompts in load_names(self.args.loads):
                if self.left() < 40:
                    runs.append({"load": f"{dataset}_c{concurrency}", "error": "deadline"})
                    continue
                runs.append(bench_serve(base, self.served, str(self.model_dir), dataset, concurrency, prompts, Path(tmp),
                                        input_len=512 if dataset == "random" else 128, output_len=128,
                                        timeout=self.left() - 20, api_key=self.key))
                print(f"[rig] {json.dumps(runs[-1])[:400]}", flush=True)
                self.result.setdefault("partial_loads", {})[runs[-1]["load"]] = runs[-1]
                self.write()
        self.result.pop("partial_loads", None)
        return {"loads": runs, "problems": [f"{r['load']}: {str(r.get('error'))[-300:]}" for r in runs if "error" in r]
                + [f"{r['load']}: {r['failed']} failed ({r.get('first_error')})" for r in runs if r.get("failed")]}

    def fault(self) -> dict[str, Any]:
        """Kill host 2's raylet under load; every answer a 200, a 503 with Retry-After or a cut stream; repair."""
        from loadgen import CLIENT_TIMEOUT_S, Load
        from waiting import wait_for

        victim = self.emu.hosts[HOSTS]
        with Load(self.base, self.served, workers=4, max_tokens=32, api_key=self.key) as load:
            load.wait_served(4, timeout=min(120, self.left()))
            before = load.window()
            pid = victim.kill("raylet")
            t_kill, wall_kill = time.monotonic(), time.time()

            def answered_since(wall: float, ok: bool) -> bool:
                return any((s == 200) == ok for t, s in list(load.events) if t >= wall)

            # An operator reacts to the first failure a client sees (a 503, even one its retry hid), not to a timer.
            try:
                wait_for(lambda: load.counts.status_503 or answered_since(wall_kill, ok=False), min(90, self.left()),
                         "a client sees the lost stage", poll=0.5)
                t_first_failure: float | None = time.monotonic() - t_kill
            except TimeoutError:
                t_first_failure = None
            r = self.cli("up", str(self.hostfile), "--json", timeout=min(300, self.left()))
            t_up = time.monotonic() - t_kill
            if r.returncode != 0:
                raise RuntimeError(f"fleetserve up after the kill failed: {(r.stdout + r.stderr)[-2000:]}")
            restarted = json.loads(r.stdout)["started"]
            wall_up = time.time()
            try:
                recovered: float | None = wait_for(lambda: answered_since(wall_up, ok=True), max(1.0, self.left() - 25),
                                                   "a request served again after the repair", poll=1)
                t_recovered: float | None = time.monotonic() - t_kill
            except TimeoutError:
                recovered = t_recovered = None
            during = load.window()
            events = [(round(t - wall_kill, 2), s) for t, s in list(load.events) if t >= wall_kill]
        problems = []
        if t_first_failure is None:
            problems.append("no client saw a failure within 90 s of the kill")
        if recovered is None:
            problems.append("no request was served again before the deadline")
        if during.timeouts:
            problems.append(f"{during.timeouts} request(s) hung past the client's {CLIENT_TIMEOUT_S:.0f}s timeout")
        if during.status_503 != during.status_503_with_retry_after:
            problems.append(f"{during.status_503 - during.status_503_with_retry_after} 503(s) without Retry-After")
        other = {code: n for code, n in during.errors.items() if code != "503"}
        if other:
            problems.append(f"answers neither 200 nor 503: {other}")
        if restarted != [victim.ip]:
            problems.append(f"fleetserve up restarted {restarted}, expected [{victim.ip}]")
        return {"raylet_pid": pid, "host": victim.ip, "before": asdict(before), "during": asdict(during),
                "seconds_to_first_failure": rounded(t_first_failure), "seconds_kill_to_up_done": round(t_up, 1),
                "seconds_up_done_to_served": rounded(recovered), "seconds_to_recovery": rounded(t_recovered),
                "events_after_kill": events[-400:], "problems": problems}

    def nccl(self, prefix: str) -> dict[str, Any]:
        files = sorted((self.workdir / "nccl").glob(f"{prefix}.*"))
        lines = [line for f in files for line in f.read_text(errors="replace").splitlines()]
        return {"files": [f.name for f in files], **nccl_summary(lines)}

    def single(self) -> dict[str, Any]:
        """The same TP x PP on this one machine: plain ``fleetserve serve`` on a local head, no emulation."""
        import httpx
        from waiting import wait_for

        shutil_rmtree(Path.home() / ".cache" / "vllm")
        state = self.workdir / "state-single"
        shutil_rmtree(state)
        env = {**os.environ, **self.serve_env(), **SAFETY_ENV, "FLEETSERVE_STATE_DIR": str(state),
               "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET,ENV",
               "NCCL_DEBUG_FILE": str(self.workdir / "nccl" / "single.%h.%p.log")}
        env.pop("RAY_ADDRESS", None)
        log = open(self.workdir / "single-serve.log", "w")
        cmd = [sys.executable, "-m", "cluster.cli", "serve", str(FILE), "--ready-timeout", str(int(self.left())),
               *self.overrides()]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{PORT}"
        try:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"fleetserve serve exited {proc.returncode}: "
                                       f"{(self.workdir / 'single-serve.log').read_text()[-2000:]}")
                return httpx.get(f"{base}/health", headers=self.headers(), timeout=10).status_code == 200

            wait_for(ready, max(1.0, self.left() - 60), "the single-host deployment answering /health 200", poll=3)
            out = {"command": " ".join(cmd[1:]), "ready_s": round(time.monotonic() - t0, 1)}
            out.update(self.bench(base))
            return out
        finally:
            stop_like_ctrl_c(proc, grace_s=90)
            self.result["nccl_single"] = self.nccl("single")

    def save_host_logs(self) -> None:
        """Each host's Ray logs (they live in its private /run), copied into the work directory before teardown."""
        import shutil

        for i, host in self.emu.hosts.items():
            pids = host.pids()
            if not pids:
                continue
            # The host's own root as seen from here; session dirs by name (session_latest is an absolute link).
            for logs in Path(f"/proc/{min(pids)}/root/run/fleetserve-ray").glob("session_2*/logs"):
                dest = self.workdir / "host-logs" / f"fs-h{i}"
                dest.mkdir(parents=True, exist_ok=True)
                for f in logs.rglob("*"):
                    if f.is_file() and f.suffix in (".out", ".err", ".log") and f.stat().st_size < 20 << 20:
                        target = dest / f.relative_to(logs)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(f, target)

    def teardown(self) -> None:
        if self.emu is None:
            return
        try:
            self.save_host_logs()
        except OSError as exc:
            print(f"[rig] could not save the hosts' Ray logs: {exc}", flush=True)
        if self.hostfile is not None:
            try:
                self.cli("down", str(self.hostfile), timeout=90)
            except subprocess.TimeoutExpired:
                pass
        self.emu.teardown()
        self.emu = None

    def main(self) -> None:
        phases = self.args.phases
        self.configure()
        self.write()
        try:
            if "up" in phases:
                self.phase("up", 60, self.up)
            if "serve" in phases:
                self.phase("serve", 120, self.serve, needs=["up"])
            for name, need, fn in (("place", 20, self.place), ("chat", 30, self.chat), ("gems", 20, self.gems),
                                   ("bench", 60, lambda: self.bench(self.base)), ("fault", 120, self.fault)):
                if name in phases:
                    self.phase(name, need, fn, needs=["up", "serve"])
            if "serve" in phases:
                self.result["nccl_emulated"] = self.nccl("emulated")
        finally:
            self.teardown()
            self.write()
        if "single" in phases:
            self.phase("single", 180, self.single)
        self.result["seconds"] = round(self.args.deadline_s - self.left(), 1)
        self.write()


# ----------------------------------------------------------------------------------------- helpers


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def png_data_url(size: int = 224) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------------------- report (here)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several calls' JSONs -> one record: the latest result of each phase, the emulated/single ratio per load."""
    phases: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.get("time", "")):
        for name, rec in run.get("phases", {}).items():
            if name not in phases or rec.get("ok") or not phases[name].get("ok"):
                phases[name] = {**rec, **{k: run[k] for k in ("commit", "commit_corrected") if k in run},
                                "device": run.get("device"), "flaggems": run.get("flaggems"),
                                "model_size": run.get("model_size")}
    emulated = {r["load"]: r for r in phases.get("bench", {}).get("loads", [])}
    single = {r["load"]: r for r in phases.get("single", {}).get("loads", [])}
    rows = []
    for name in [f"{d}_c{c}" for d, c, _ in LOADS]:
        e, s = emulated.get(name, {}), single.get(name, {})
        if not e and not s:
            continue
        row = {"load": name, "two_hosts_tok_s": e.get("output_throughput"), "one_host_tok_s": s.get("output_throughput"),
               "two_hosts_ttft_p50_ms": e.get("median_ttft_ms"), "one_host_ttft_p50_ms": s.get("median_ttft_ms"),
               "two_hosts_tpot_p50_ms": e.get("median_tpot_ms"), "one_host_tpot_p50_ms": s.get("median_tpot_ms"),
               "failed": [e.get("failed"), s.get("failed")]}
        if row["two_hosts_tok_s"] and row["one_host_tok_s"]:
            row["ratio"] = round(row["two_hosts_tok_s"] / row["one_host_tok_s"], 4)
        rows.append(row)
    nccl = {k: run[k] for run in runs for k in ("nccl_emulated", "nccl_single") if run.get(k, {}).get("info_lines")}
    return {"phases": phases, "rows": rows, "nccl": nccl,
            "not_run": [p for p in PHASES if p not in phases or phases[p].get("skipped")]}


def report(args: argparse.Namespace) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    for item in args.run_commit:  # a run that recorded a stale .git's commit: corrected, what it said kept
        label, commit = item.split("=", 1)
        named = [run for path, run in zip(args.results, runs) if Path(path).stem == label]
        if len(named) != 1:
            sys.exit(f"--run-commit {item}: {len(named)} run files named {label}.json (runs: "
                     f"{', '.join(Path(p).stem for p in args.results)})")
        named[0]["commit_corrected"] = {"recorded": named[0].get("commit"), "by": f"--run-commit {item}"}
        named[0]["commit"] = commit
    merged = merge_runs(runs)
    devices = sorted({r.get("device") for r in runs})
    out = {"what": "two emulated hosts on one GPU machine (tests/hosts/emulation.py), fleetserve up + serve, "
                   "TP x PP with one PP stage per host, vs the same TP x PP on one host; client vllm bench serve",
           "commit": runs[-1].get("commit"), "device": devices[0] if len(devices) == 1 else devices, "time": utc_now(),
           "report_command": command_line(), "run_commands": [r.get("command") for r in runs],
           "run_commits": [r.get("commit") for r in runs], **merged,
           "note": args.note}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1, default=str))
    print("| load | one host tok/s | two hosts tok/s | ratio | TTFT p50 one / two (ms) | TPOT p50 one / two (ms) |")
    print("|---|---|---|---|---|---|")
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in merged["rows"]:
        ratio = f"{r['ratio'] * 100:.1f}%" if r.get("ratio") else "-"
        print(f"| {r['load']} | {f(r['one_host_tok_s'])} | {f(r['two_hosts_tok_s'])} | {ratio} | "
              f"{f(r['one_host_ttft_p50_ms'])} / {f(r['two_hosts_ttft_p50_ms'])} | "
              f"{f(r['one_host_tpot_p50_ms'])} / {f(r['two_hosts_tpot_p50_ms'])} |")
    print(f"NCCL: {json.dumps({k: v['transports'] for k, v in merged['nccl'].items()})}")
    print(f"not run: {merged['not_run']}")
    from serve_vs_plain import plot_ratio_bars

    plot_ratio_bars(merged["rows"], ("one_host_tok_s", "one host"), ("two_hosts_tok_s", "two emulated hosts"),
                    f"{out['device']} @ {str(out['commit'])[:8]}", args.results_dir / f"{args.name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phases", default="up,serve,place,chat,bench", help=f"comma list of {','.join(PHASES)}")
    r.add_argument("--out", required=True)
    r.add_argument("--deadline-s", type=float, default=540)
    r.add_argument("--gpus", type=int, default=0, help="GPUs to split over the two hosts (default: nvidia-smi's)")
    r.add_argument("--model-size", default="32b", choices=("7b", "32b"))
    r.add_argument("--model-dir", default="", help="default /tmp/models/qwen2_5_vl_SIZE (made if missing)")
    r.add_argument("--flaggems", default="off", choices=("on", "off"))
    r.add_argument("--loads", default="", help="comma list of LOAD names (e.g. random_c1,random-mm_c16); default all")
    r.add_argument("--set", action="append", default=[], help="more --set overrides for the deployment")
    r.add_argument("--workdir", default=str(WORKDIR))
    r.add_argument("--cpu-dry-run", action="store_true", help="CPU: the up phase with logical GPUs, no vLLM")
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--note", default="")
    p.add_argument("--run-commit", action="append", default=[], metavar="LABEL=SHA",
                   help="the commit the run file LABEL.json really ran, where it recorded another "
                        "(kept as commit_corrected)")
    args = parser.parse_args()
    if args.cmd == "report":
        report(args)
        return
    try:
        args.phases = parse_phases(args.phases, args.cpu_dry_run)
        load_names(args.loads)
    except ValueError as exc:
        parser.error(str(exc))
    Run(args).main()


if __name__ == "__main__":
    main()
