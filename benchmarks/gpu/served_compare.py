"""Served-endpoint GPU benchmark: stock vLLM vs FlagGems behind the deployment file.

Everything goes through the project's own serving path: the ``args:`` of
``deployments/qwen25_vl.yaml`` (``${VAR}`` expansion and validation of
:mod:`cluster.serving.spec`), :func:`cluster.serving.app.build_app` (Ray Serve +
``ray.serve.llm`` + vLLM, the FleetIngress with ``/health``), one local Ray
cluster with the one GPU. Weights are vLLM's ``load_format: dummy`` on a model
directory of the real architecture (``fleetserve make-model``).

Phases (one Serve app at a time; each is deployed, used, deleted):

* ``stock``          deployments/qwen25_vl.yaml with a Qwen2.5-VL-7B dir, TP=1
                     (the file says TP=8 for the 32B), FlagGems off
* ``gems_compiled``  the same with ``flaggems: {enabled: true}`` (graph_mode compiled)
* ``gems_eager``     the same with ``flaggems: {enabled: true, graph_mode: eager}``

Each phase records the startup time (deploy -> ``/health`` 200), the peak GPU
memory (NVML, whole device), ``/health``'s FlagGems report, one text and one
image (PNG data URL) chat request as a sanity check, and the serving benchmark
through ``vllm bench serve`` (benchmarks/vllm_bench.py: random prompts at fixed
concurrency, ``--ignore-eos``; TTFT/TPOT/throughput as vLLM measures them).
The deployment files themselves are validated on GPUs by ``pytest -m gpu``
(tests/test_gpu.py), not here.

    # on the GPU machine (see benchmarks/gpu/run_served.sh)
    python3 benchmarks/gpu/served_compare.py run --out $OUT/served.json --deadline-s 540
    # here, from what came back (one or more runs of one machine, merged): served_gpu_qwen25vl7b.{json,png}
    python3 benchmarks/gpu/served_compare.py report run1/served.json [run2/served.json ...] \
        [--not-run PHASE=REASON] [--note TEXT]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import command_line, provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QWEN_YAML = ROOT / "deployments" / "qwen25_vl.yaml"

#: (concurrency, requests) per level: few requests where each takes long (c=1).
LEVELS = ((1, 8), (16, 64), (64, 128))
MAX_TOKENS = 128
INPUT_LEN = 64  # random prompt tokens per request

#: Phase -> its ``flaggems`` block (None: FlagGems off), in report order.
PHASES: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "gems_compiled": {"enabled": True},
    "gems_eager": {"enabled": True, "graph_mode": "eager"},
}
#: Seconds a phase needs at least (start + requests + teardown) to be worth starting.
MIN_PHASE_S = {"stock": 150, "gems_compiled": 150, "gems_eager": 100}


# -- spec ----------------------------------------------------------------------------------
def phase_args(phase: str, qwen_dir: str, ray_accel: list[str]) -> tuple[str, dict[str, Any], dict]:
    """The Serve app name and ``args`` of one phase, from the deployment YAML plus overrides."""
    import yaml

    from cluster.serving.spec import expand_env

    flaggems = PHASES[phase]
    env = dict(os.environ, FLEETSERVE_LOAD_FORMAT="dummy", QWEN25_VL_32B_PATH=qwen_dir, QWEN25_VL_MAX_REPLICAS="1",
               FLEETSERVE_USE_FLAGGEMS="true" if flaggems else "false")
    app = yaml.safe_load(QWEN_YAML.read_text())["applications"][0]
    args = expand_env(app["args"], env)
    # The file is the 32B on 8 GPUs; one GPU holds the 7B of the same architecture.
    args["tensor_parallel_size"] = 1
    args["model"]["served_name"] = "Qwen2.5-VL-7B-Instruct"
    overrides: dict[str, Any] = {"model.load_format": "dummy", "tensor_parallel_size": 1,
                                 "model.served_name": "Qwen2.5-VL-7B-Instruct", "model.source": qwen_dir}
    if flaggems:
        args["flaggems"] = dict(flaggems)
        overrides["flaggems"] = dict(flaggems)
    # accelerator_type: H100 is a Ray resource only on H100 nodes; on another GPU use what Ray saw.
    want = args.get("accelerator_type")
    if want and f"accelerator_type:{want}" not in ray_accel:
        args["accelerator_type"] = ray_accel[0].split(":", 1)[1] if ray_accel else None
        overrides["accelerator_type"] = args["accelerator_type"]
    return app["name"], args, {"file": str(QWEN_YAML.relative_to(ROOT)), "overrides": overrides}


# -- GPU memory ------------------------------------------------------------------------------
class GpuMemSampler:
    """Peak device memory in use (NVML: all processes), sampled every 0.25 s."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._h).used)

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._h).total)

    def reset(self) -> None:
        self.peak = self.used()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.used())
            except Exception:
                pass
            time.sleep(0.25)

    def gpu_pids(self) -> list[int]:
        try:
            return [p.pid for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._h)]
        except Exception:
            return []

    def device(self) -> dict[str, Any]:
        n = self._nvml
        name = n.nvmlDeviceGetName(self._h)
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "driver": _s(n.nvmlSystemGetDriverVersion()),
                "memory_total_gib": round(self.total() / 2**30, 2)}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- requests -------------------------------------------------------------------------------
def small_png() -> str:
    from PIL import Image

    img = Image.new("RGB", (224, 224))
    img.putdata([(x, y, (x + y) // 2) for y in range(224) for x in range(224)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}


def use_fresh_api_key(directory: Path) -> None:
    """A key for this run: the deployment file's endpoint needs one (its ``api_keys_file``).

    The file is what the spec reads (``FLEETSERVE_API_KEYS_FILE``); the client reads
    ``OPENAI_API_KEY``, as ``vllm bench serve`` does.
    """
    import secrets

    key = secrets.token_urlsafe(32)
    path = directory / "api-keys"
    path.write_text(key + "\n")
    path.chmod(0o600)
    os.environ["FLEETSERVE_API_KEYS_FILE"] = str(path)
    os.environ["OPENAI_API_KEY"] = key


def validate(url: str, model: str) -> dict[str, Any]:
    """One text and one image chat request, not streamed; status codes and usage."""
    import httpx

    out: dict[str, Any] = {}
    r = httpx.get(f"{url}/v1/models", timeout=30, headers=auth_headers())
    out["models"] = {"status": r.status_code, "ids": [m.get("id") for m in r.json().get("data", [])]
                     if r.status_code == 200 else r.text[:300]}
    image = small_png()
    requests = {
        "text": [{"role": "user", "content": "Name three colours."}],
        "image": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "Describe this image."}]}],
    }
    for kind, messages in requests.items():
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, headers=auth_headers(), json={
                "model": model, "messages": messages, "max_tokens": 16, "temperature": 0})
            rec: dict[str, Any] = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 3)}
            if r.status_code == 200:
                body = r.json()
                rec["usage"] = body.get("usage")
                rec["finish_reason"] = body["choices"][0].get("finish_reason")
                rec["text_head"] = (body["choices"][0]["message"].get("content") or "")[:60]
            else:
                rec["error"] = r.text[:500]
        except Exception as exc:
            rec = {"status": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
        if kind == "image":
            rec["image"] = "224x224 PNG as a data URL (%d bytes base64)" % len(image)
        out[kind] = rec
    return out


def bench(url: str, model: str, tokenizer: str, deadline: float) -> list[dict[str, Any]]:
    """The serving benchmark through the shared client (benchmarks/vllm_bench.py: ``vllm bench serve``)."""
    import tempfile

    from vllm_bench import as_level, bench_serve

    levels = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up (compile, first requests), not recorded.
        bench_serve(url, model, tokenizer, "random", 16, 16, Path(tmp), input_len=INPUT_LEN, output_len=16)
        for c, n in LEVELS:
            if time.monotonic() > deadline - 20:
                print(f"  c={c}: skipped, the call's deadline is near", flush=True)
                levels.append({"concurrency": c, "requests": n, "skipped": "not run: call deadline"})
                continue
            lv = as_level(bench_serve(url, model, tokenizer, "random", c, n, Path(tmp), input_len=INPUT_LEN,
                                      output_len=MAX_TOKENS))
            if "error" in lv:
                raise RuntimeError(f"vllm bench serve at c={c}: {lv['error']}")
            print(f"  c={c:3d} n={n:3d}  {lv['output_tok_per_s']:8.1f} tok/s  TTFT p50 {lv['ttft_p50_s']*1000:7.1f} ms  "
                  f"TPOT p50 {lv['tpot_p50_s']*1000:6.2f} ms  failed {lv['failed']}", flush=True)
            levels.append(lv)
    return levels


# -- one phase ----------------------------------------------------------------------------------
def app_status(name: str) -> tuple[str, str]:
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception as exc:
        return "UNKNOWN", str(exc)
    if app is None:
        return "MISSING", ""
    msg = app.message or ""
    for dep in app.deployments.values():
        if dep.message:
            msg += f" | {dep.message}"
    return str(getattr(app.status, "value", app.status)), msg


def wait_up(url: str, name: str, deadline: float) -> dict[str, Any]:
    import httpx

    last = ""
    while time.monotonic() < deadline:
        status, msg = app_status(name)
        # Serve retries a replica whose constructor raised; one vLLM failure is enough to know.
        if status in ("DEPLOY_FAILED", "UNHEALTHY") or "failed to start" in msg:
            return {"ok": False, "app_status": status, "message": msg[-3000:]}
        if status == "RUNNING":
            try:
                r = httpx.get(f"{url}/health", timeout=15, headers=auth_headers())
                if r.status_code == 200:
                    return {"ok": True, "health": r.json()}
                last = r.text[:300]
            except httpx.HTTPError as exc:
                last = str(exc)
        time.sleep(1.0)
    status, msg = app_status(name)
    return {"ok": False, "app_status": status, "message": f"not healthy before the phase deadline; {msg} {last}"[-3000:]}


def ray_log_tail(lines: int = 120) -> str:
    logs = Path("/tmp/ray/session_latest/logs")
    files = sorted(logs.glob("serve/replica_*.log"), key=lambda p: p.stat().st_mtime)[-2:]
    files += sorted(logs.glob("worker-*.err"), key=lambda p: p.stat().st_mtime)[-3:]
    out = []
    for f in files:
        try:
            text = f.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"===== {f}\n" + "\n".join(text))
    return "\n".join(out)


def teardown(name: str, mem: GpuMemSampler) -> dict[str, Any]:
    from ray import serve

    t0 = time.monotonic()
    try:
        serve.delete(name, _blocking=True)
    except Exception as exc:
        print(f"  serve.delete: {exc}", flush=True)
    while time.monotonic() - t0 < 45 and mem.used() > 2 * 2**30:
        time.sleep(0.5)
    killed = []
    if mem.used() > 2 * 2**30:
        for pid in mem.gpu_pids():  # leftovers of this run's engines, on the device machine
            try:
                os.kill(pid, 9)
                killed.append(pid)
            except OSError:
                pass
        time.sleep(3)
    return {"seconds": round(time.monotonic() - t0, 1), "gpu_used_after_gib": round(mem.used() / 2**30, 2),
            "killed_pids": killed}


def run_phase(phase: str, qwen_dir: str, ray_accel: list[str], mem: GpuMemSampler,
              url: str, phase_deadline: float, log_path: Path) -> dict[str, Any]:
    from ray import serve

    from cluster.serving.app import build_app

    name, args, spec_info = phase_args(phase, qwen_dir, ray_accel)
    served = args["model"]["served_name"]
    rec: dict[str, Any] = {"phase": phase, "app": name, "served_name": served, "spec": spec_info,
                           "args": args}
    print(f"== {phase}: {spec_info['file']} overrides {spec_info['overrides']}", flush=True)
    mem.reset()
    t0 = time.monotonic()
    try:
        serve._run(build_app(args), _blocking=False, name=name, route_prefix="/")
        up = wait_up(url, name, phase_deadline - 75)  # leave time for the requests and the teardown
    except Exception as exc:
        up = {"ok": False, "message": f"{type(exc).__name__}: {exc}"[-3000:]}
    rec["startup_s"] = round(time.monotonic() - t0, 1)
    rec["started"] = up["ok"]
    rec["peak_gpu_mem_after_start_gib"] = round(mem.peak / 2**30, 2)
    print(f"  started={up['ok']} in {rec['startup_s']} s, GPU peak {rec['peak_gpu_mem_after_start_gib']} GiB", flush=True)
    if not up["ok"]:
        rec["error"] = {k: v for k, v in up.items() if k != "ok"}
        with log_path.open("a") as fh:
            fh.write(f"\n######## {phase} failed to start\n{ray_log_tail()}\n")
    else:
        rec["health_status"] = 200
        rec["validation"] = validate(url, served)
        print(f"  validation: text {rec['validation']['text']['status']} image {rec['validation']['image']['status']}",
              flush=True)
        try:
            rec["levels"] = bench(url, served, str(args["model"]["source"]), phase_deadline)
        except Exception as exc:
            rec["bench_error"] = f"{type(exc).__name__}: {exc}"
        # Read after the load: the ingress collects the replicas' kernel reports every
        # REPORT_POLL_S, so the first /health 200 may come before them.
        import httpx

        health = httpx.get(f"{url}/health", timeout=15, headers=auth_headers()).json()
        info = health.get("models", {}).get(served, {})
        fg = info.get("flaggems", {})
        rec["flaggems"] = {
            "summary": fg.get("summary"),
            "processes": [{k: p.get(k) for k in ("process", "pid", "status", "graph_mode", "requested_ops",
                                                  "ops", "kernels_loaded", "versions")}
                          for p in fg.get("processes", [])],
        }
        print(f"  flaggems: {fg.get('summary')}", flush=True)
        rec["peak_gpu_mem_gib"] = round(mem.peak / 2**30, 2)
    rec["teardown"] = teardown(name, mem)
    rec["phase_s"] = round(time.monotonic() - t0, 1)
    return rec


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("vllm", "ray", "torch", "flag-gems", "triton", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cmd_run(a: argparse.Namespace) -> None:
    start = time.monotonic()
    end = start + a.deadline_s
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name("ray_logs.txt")
    mem = GpuMemSampler()
    result: dict[str, Any] = {
        **provenance(),  # its device line is replaced by NVML's record just below
        "device": mem.device(), "versions": versions(), "host": {"cpus": os.cpu_count(), "node": platform.node()},
        "workload": {"levels": [{"concurrency": c, "requests": n} for c, n in LEVELS], "max_tokens": MAX_TOKENS,
                     "input_len": INPUT_LEN, "ignore_eos": True, "dataset": "random",
                     "driver": "vllm bench serve --backend openai-chat (benchmarks/vllm_bench.py)"},
        "phases": {},
    }

    def save() -> None:
        result["elapsed_s"] = round(time.monotonic() - start, 1)
        out.write_text(json.dumps(result, indent=1, default=str))

    import tempfile

    import ray
    from ray import serve

    use_fresh_api_key(Path(tempfile.mkdtemp(prefix="served-compare-")))
    t0 = time.monotonic()
    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    result["ray_start_s"] = round(time.monotonic() - t0, 1)
    ray_accel = [k for k in ray.cluster_resources() if k.startswith("accelerator_type:")]
    result["ray_accelerator_resources"] = ray_accel
    save()
    url = f"http://127.0.0.1:{a.port}"
    for phase in a.phases.split(","):
        left = end - time.monotonic()
        if left < MIN_PHASE_S[phase]:
            result["phases"][phase] = {"phase": phase, "skipped": f"not run: {left:.0f} s left in the call, "
                                                                  f"needs ~{MIN_PHASE_S[phase]} s"}
            print(f"== {phase}: skipped ({left:.0f} s left)", flush=True)
            save()
            continue
        try:
            rec = run_phase(phase, a.qwen_dir, ray_accel, mem, url, end, log_path)
        except Exception:
            rec = {"phase": phase, "error": traceback.format_exc()[-3000:]}
            print(rec["error"], flush=True)
        result["phases"][phase] = rec
        save()
    serve.shutdown()
    ray.shutdown()
    save()
    print(f"done in {result['elapsed_s']} s", flush=True)


# -- report (here, from what came back) -------------------------------------------------------------
def merge_runs(paths: list[str]) -> dict[str, Any]:
    """Several ``run`` outputs of one machine as one: per phase the first attempt that
    started wins; every attempt is kept under ``attempts`` (run time, started, startup_s)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    raw = dict(runs[0])
    phases: dict[str, Any] = {}
    attempts: dict[str, list[dict[str, Any]]] = {}
    for i, run in enumerate(runs):
        for name, ph in run["phases"].items():
            attempts.setdefault(name, []).append({
                "run": i, "run_time": run.get("time"), "started": ph.get("started"),
                "startup_s": ph.get("startup_s"), "skipped": ph.get("skipped"),
                "error": (ph.get("error") or {}).get("message", "")[:300] if isinstance(ph.get("error"), dict)
                else ph.get("error")})
            if name not in phases or (not phases[name].get("started") and ph.get("started")):
                phases[name] = dict(ph, run=i, run_time=run.get("time"))
    raw["phases"] = phases
    raw["attempts"] = attempts
    raw["runs"] = [{"time": r.get("time"), "elapsed_s": r.get("elapsed_s"), "ray_start_s": r.get("ray_start_s"),
                    "phases": list(r["phases"])} for r in runs]
    return raw


def cmd_report(a: argparse.Namespace) -> None:
    raw = merge_runs(a.served_json)
    phases = raw["phases"]
    for item in a.not_run:
        name, _, why = item.partition("=")
        if not (phases.get(name) or {}).get("started"):
            phases[name] = {"phase": name, "skipped": why}
    common = {k: raw.get(k) for k in ("commit", "command", "device", "versions", "host", "time", "runs")}
    common["report_command"] = command_line()
    modes: dict[str, Any] = {}
    for m in PHASES:
        p = phases.get(m)
        if p is None:
            modes[m] = {"status": "not run: not in this call"}
            continue
        if "skipped" in p or not p.get("started") or "levels" not in p:
            modes[m] = {"status": p.get("skipped") or "failed", "error": p.get("error") or p.get("bench_error"),
                        "startup_s": p.get("startup_s")}
            continue
        fg = p.get("flaggems") or {}
        modes[m] = {
            "status": "ok", "flaggems_block": (p["spec"]["overrides"].get("flaggems")),
            "triton_ops": (fg.get("summary") or {}).get("triton_ops", []),
            "flaggems_status": (fg.get("summary") or {}).get("status"),
            "startup_s": p["startup_s"], "peak_gpu_mem_gib": p.get("peak_gpu_mem_gib"),
            "run": p.get("run"), "attempts": raw["attempts"].get(m),
            "levels": [lv for lv in p["levels"] if "skipped" not in lv],
            "levels_skipped": [lv["concurrency"] for lv in p["levels"] if "skipped" in lv],
        }
    ratios = {}
    if modes.get("stock", {}).get("status") == "ok":
        base = {lv["concurrency"]: lv for lv in modes["stock"]["levels"]}
        for m in list(PHASES)[1:]:
            if modes.get(m, {}).get("status") != "ok":
                continue
            ratios[m] = {str(lv["concurrency"]): {
                "tok_s_ratio": round(lv["output_tok_per_s"] / base[lv["concurrency"]]["output_tok_per_s"], 4),
                "ttft_p50_ratio": round(lv["ttft_p50_s"] / base[lv["concurrency"]]["ttft_p50_s"], 4),
                "tpot_p50_ratio": round(lv["tpot_p50_s"] / base[lv["concurrency"]]["tpot_p50_s"], 4),
            } for lv in modes[m]["levels"] if lv["concurrency"] in base}
    stock = phases.get("stock", {})
    bench_out = {
        "what": "Served endpoint (Ray Serve + ray.serve.llm + vLLM through cluster.serving.app:build_app), "
                "Qwen2.5-VL-7B architecture with load_format dummy, TP=1, deployments/qwen25_vl.yaml's args "
                "with overrides (workload.driver: the client that measured)",
        **common, "workload": raw.get("workload"),
        "spec": {"file": stock.get("spec", {}).get("file"), "overrides": stock.get("spec", {}).get("overrides"),
                 "engine_args": (stock.get("args") or {}).get("engine_args"),
                 "limit_mm_per_prompt": (stock.get("args") or {}).get("limit_mm_per_prompt")},
        "modes": modes, "ratio_vs_stock": ratios, "notes": a.note,
        "reproduce": REPRODUCE,
    }
    out = RESULTS / "served_gpu_qwen25vl7b"
    out.with_suffix(".json").write_text(json.dumps(bench_out, indent=1) + "\n")
    plot(bench_out, out.with_suffix(".png"))
    print(json.dumps({"modes": {m: v.get("status") for m, v in modes.items()}, "ratios": ratios}, indent=1))


REPRODUCE = [
    "bash ../shared/gpu/make-bundle.sh   # here, once; then stage .gpu-bundle/p0..pN (device calls)",
    "device run (timeout_s 600; run_served.sh makes the 7B model dir there if missing): "
    "FLEETSERVE_COMMIT=<sha> bash benchmarks/gpu/run_served.sh stock,gems_compiled 550",
    "device run (same machine, warm; the phase the first call's time did not reach): "
    "FLEETSERVE_COMMIT=<sha> bash benchmarks/gpu/run_served.sh gems_compiled 540",
    "python3 benchmarks/gpu/served_compare.py report <files_at>/served.json [more runs' served.json]",
]


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    styles = {"stock": ("o-", "tab:blue"), "gems_compiled": ("s-", "tab:orange"), "gems_eager": ("^--", "tab:green")}
    for m, v in res["modes"].items():
        if v.get("status") != "ok":
            continue
        c = [lv["concurrency"] for lv in v["levels"]]
        st, col = styles[m]
        axes[0].plot(c, [lv["output_tok_per_s"] for lv in v["levels"]], st, color=col, label=m)
        axes[1].plot(c, [lv["ttft_p50_s"] * 1000 for lv in v["levels"]], st, color=col, label=m)
        axes[2].plot(c, [lv["tpot_p50_s"] * 1000 for lv in v["levels"]], st, color=col, label=m)
    for ax, title, ylabel in zip(axes, ("output throughput", "TTFT p50", "TPOT p50"), ("tokens/s", "ms", "ms")):
        ax.set(title=title, xlabel="concurrency", ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    w = res.get("workload") or {}
    fig.suptitle(f"Served Qwen2.5-VL-7B (dummy weights, TP=1) on {res['device']['name']}: Ray Serve + vLLM "
                 f"{res['versions'].get('vllm')}, {w.get('max_tokens')} output tokens, "
                 f"requests/level {[lv['requests'] for lv in w.get('levels', [])]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="on the GPU machine")
    r.add_argument("--out", required=True)
    r.add_argument("--phases", default=",".join(PHASES))
    r.add_argument("--deadline-s", type=float, default=540)
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--qwen-dir", default=str(ROOT / ".models/served_gpu/qwen2_5_vl_7b"))
    p = sub.add_parser("report", help="here: the results JSON + plot from run's JSON")
    p.add_argument("served_json", nargs="+", help="run outputs of one machine, merged in order")
    p.add_argument("--not-run", action="append", default=[], metavar="PHASE=REASON",
                   help="why a phase that did not start was not run (replaces the run's own skip text)")
    p.add_argument("--note", action="append", default=[], help="a note to put into the results file")
    a = ap.parse_args()
    unknown = sorted(set(a.phases.split(",")) - set(PHASES)) if a.cmd == "run" else []
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    cmd_run(a) if a.cmd == "run" else cmd_report(a)


if __name__ == "__main__":
    main()
