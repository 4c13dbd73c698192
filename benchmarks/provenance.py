"""Where a result came from: git commit, device, command line and time, for every JSON in benchmarks/results.

Every script (and test) that writes a result file puts :func:`provenance` at its
top, so a figure can always be traced to the code and the machine that made it.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree_commit() -> str | None:
    """The checked-out commit (``-dirty`` when tracked files differ from it), or None outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if re.fullmatch(r"[0-9a-f]{40}", head):
            return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _named_commit() -> str | None:
    """``FLEETSERVE_COMMIT``, which wins over the checkout's when set.

    On a device machine the tree travels without its history, or with a stale
    ``.git`` (seen: a run recorded the session's first commit, ``-dirty``), so the
    caller names the commit (``git rev-parse HEAD`` where the run was started).
    """
    named = os.environ.get("FLEETSERVE_COMMIT", "")
    return named if named and named != "unknown" else None


def device() -> str:
    """The GPUs as ``N x NAME, MEM`` (nvidia-smi), else the CPU and its core count."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return f"{len(out)} x {out[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, no GPU"


def command_line() -> str:
    """The command that ran, as one shell line (the interpreter, the script or ``-m`` module, its arguments)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("pytest/__main__.py"):  # python -m pytest ...
        argv[0] = "-m pytest"
        return f"{shlex.quote(sys.executable)} {argv[0]} {shlex.join(argv[1:])}".rstrip()
    return shlex.join([sys.executable, *argv])


def utc_now() -> str:
    """The time a result is written, as every result JSON's ``time`` gives it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def provenance() -> dict[str, str]:
    """The fields every result JSON starts with."""
    named, tree = _named_commit(), _tree_commit()
    fields = {"commit": named or tree or "unknown", "device": device(), "command": command_line(), "time": utc_now()}
    if named and tree and tree != named:  # a named commit the checkout disagrees with: keep both
        fields["tree_commit"] = tree
    return fields
