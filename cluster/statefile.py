"""Where ``fleetserve up`` records the cluster it brought up (hostfile, GCS address, dashboard).

Its own module, free of SSH and Ray imports, so that commands which only read
it (``fleetserve serve`` finding the cluster to serve on) run where the fleet
layer's dependencies are not installed.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_file(state_dir: Path | None = None) -> Path:
    """Where ``up`` records the last hostfile, so ``down``/``status`` work without one."""
    base = state_dir or Path(os.environ.get("FLEETSERVE_STATE_DIR", Path.home() / ".local/state/fleetserve"))
    return Path(base) / "cluster.json"
