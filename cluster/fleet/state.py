"""Where ``fleetserve up`` records the cluster it brought up (hostfile, GCS address, dashboard, token path).

Free of SSH and Ray imports, so that commands which only read it (``fleetserve
serve`` finding the cluster to serve on) run where the fleet layer's other
dependencies are not installed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cluster.errors import FleetserveError
from cluster.fleet.hostfile import ClusterConfig, load_hostfile


def state_file(state_dir: Path | None = None) -> Path:
    """Where ``up`` records the last hostfile, so ``down``/``status`` work without one."""
    base = state_dir or Path(os.environ.get("FLEETSERVE_STATE_DIR", Path.home() / ".local/state/fleetserve"))
    return Path(base) / "cluster.json"


def record_cluster(state_dir: Path | None, hostfile: Path, address: str, dashboard: str | None,
                   token_path: Path | None) -> None:
    """Write the state file after a successful ``up``. ``token_path``: this machine's copy (never the token)."""
    path = state_file(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hostfile": str(hostfile.resolve()), "address": address, "dashboard": dashboard,
                                "time": time.time(), "token_path": str(token_path) if token_path else None}, indent=2))


def forget_cluster(state_dir: Path | None, address: str) -> None:
    """Drop the record after ``down`` stopped that cluster's head, so nothing later targets a stopped cluster."""
    path = state_file(state_dir)
    try:
        if json.loads(path.read_text()).get("address") == address:
            path.unlink()
    except (OSError, ValueError):
        pass


def resolve_hostfile(hostfile: Path | None, state_dir: Path | None = None) -> ClusterConfig:
    """The given hostfile, else the one the last successful ``up`` used."""
    if hostfile is None:
        path = state_file(state_dir)
        if not path.exists():
            raise FleetserveError("no hostfile given and no cluster brought up yet "
                                  f"({path} missing)\n  fix: pass the HOSTFILE used with fleetserve up")
        hostfile = Path(json.loads(path.read_text())["hostfile"])
    return load_hostfile(hostfile)
