"""Where a served run's ready time goes: milestones read from the logs a ``serve_vs_plain.py run`` keeps.

A run's JSON gives its start (``time``, taken as the server process starts) and
``ready_s``; beside it lie the server's own output (``NAME.log``) and, for the
runs through Ray, the Ray session's logs (``NAME.ray-logs.tar.gz``). Each
milestone is the first log line that marks it; the table says when each came,
seconds after the start, and how long the step before it took. Lines no log has
are left out (vLLM's INFO lines appear in a Serve replica only when the run set
``VLLM_LOGGING_LEVEL=INFO``; ``fleetserve serve`` lowers it to WARNING by default).

Written here because neither Ray nor vLLM reports a start-up timeline across
the processes involved (CLI, Ray head, Serve controller, replica, engine core,
TP workers); the lines are the ones Ray 2.58.0 and vLLM 0.26.0 print.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: vLLM's lines (plain ``vllm serve``'s output; a replica's worker logs): (milestone, text in the line).
VLLM_MILESTONES = [
    ("vLLM config resolved", "Resolved architecture"),
    ("engine core starting", "Initializing a V1 LLM engine"),
    ("weights loading", "Loading model from scratch"),
    ("weights loaded", "Model loading took"),
    ("torch.compile done", "torch.compile took"),
    ("CUDA graphs captured", "Graph capturing finished"),
    ("engine initialized (KV cache, warm-up)", "init engine (profile"),
    ("HTTP server starting", "Starting vLLM server on"),
]
#: Ray's and Serve's lines: (milestone, file name pattern in the session's logs, text in the line).
RAY_MILESTONES = [
    ("Ray head up (raylet)", r"/raylet\.out$", "Setting cluster ID"),
    ("Serve app deploy asked", r"/serve/controller_\d+\.log$", "Deploying new app"),
    ("app built in the cluster", r"/serve/controller_\d+\.log$", "Deploying new version of Deployment"),
    ("replica actor running", r"/serve/replica_.*LLMServer.*\.log$", "Started initializing replica"),
    ("vLLM engine creation (config resolved)", r"/serve/replica_.*LLMServer.*\.log$", "Clearing the current platform cache"),
    ("engine core joined Ray", r"/worker-.*\.err$", "(EngineCore pid="),
    ("vLLM engine started", r"/serve/replica_.*LLMServer.*\.log$", "Started vLLM engine"),
    ("replica ready", r"/serve/replica_.*LLMServer.*\.log$", "Finished initializing replica"),
]
_RAY_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")  # Ray / Serve: 2026-11-28 10:55:27,585
_VLLM_STAMP = re.compile(r"(?:INFO|WARNING|DEBUG|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d)")  # vLLM: INFO 11-28 11:04:59


def _stamp(line: str, year: int) -> dt.datetime | None:
    if m := _RAY_STAMP.search(line):
        return dt.datetime.strptime(f"{m[1]}.{m[2]}", "%Y-%m-%d %H:%M:%S.%f")
    if m := _VLLM_STAMP.search(line):
        return dt.datetime.strptime(f"{year}-{m[1]}", "%Y-%m-%d %H:%M:%S")
    return None


def _first(lines: Iterable[str], text: str, year: int, earliest: dt.datetime) -> dt.datetime | None:
    for line in lines:
        if text in line and (when := _stamp(line, year)) and when >= earliest:
            return when
    return None


def ray_log_lines(archive: Path) -> dict[str, list[str]]:
    """Every text file in a kept Ray-logs archive: member name -> lines."""
    files: dict[str, list[str]] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and (f := tar.extractfile(member)):
                files[member.name] = f.read().decode(errors="replace").splitlines()
    return files


def milestones(run: dict[str, Any], run_path: Path) -> list[dict[str, Any]]:
    """The run's milestones in time order: ``{"milestone", "at_s", "step_s"}``, ending at ``ready``.
    Ray's and Serve's lines are stamped to the millisecond, vLLM's to the second."""
    if "start_local" in run:  # the logs' clock and zone, to the millisecond
        start = dt.datetime.fromisoformat(run["start_local"])
    elif "time" in run:  # older runs: UTC to the second (the GPU machines' logs are in UTC)
        start = dt.datetime.strptime(run["time"], "%Y-%m-%dT%H:%M:%SZ")
    else:
        return []
    earliest = start - dt.timedelta(seconds=1)  # lines of an earlier session left in /tmp are not this run's
    found: dict[str, dt.datetime] = {}
    log = run_path.with_suffix(".log")
    server_lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    archive = run_path.with_suffix(".ray-logs.tar.gz")
    ray_files = ray_log_lines(archive) if archive.exists() else {}
    for name, pattern, text in RAY_MILESTONES:
        times = [t for member, lines in sorted(ray_files.items()) if re.search(pattern, member)
                 if (t := _first(lines, text, start.year, earliest))]
        if times:
            found[name] = min(times)
    vllm_sources = [server_lines] + [lines for member, lines in ray_files.items()
                                     if re.search(r"/worker-.*\.(out|err)$", member)]
    for name, text in VLLM_MILESTONES:
        times = [t for lines in vllm_sources if (t := _first(lines, text, start.year, earliest))]
        if times:
            found[name] = min(times)
    if run.get("ready_s") is not None:
        found["ready (/health 200 to the client)"] = start + dt.timedelta(seconds=run["ready_s"])
    rows, previous = [], 0.0
    for name, when in sorted(found.items(), key=lambda item: item[1]):
        at = round((when - start).total_seconds(), 1)
        rows.append({"milestone": name, "at_s": at, "step_s": round(at - previous, 1)})
        previous = at
    return rows


def table(phases: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table per run: milestone, seconds after the start, the step before it."""
    out = []
    for label, rows in phases.items():
        out += [f"{label}:", "", "| milestone | at s | step s |", "|---|---|---|"]
        out += [f"| {r['milestone']} | {r['at_s']} | {r['step_s']} |" for r in rows] + [""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(table({p: milestones(json.loads(Path(p).read_text()), Path(p)) for p in sys.argv[1:]}))
