"""pytest fixtures for emulated hosts (tests/conftest.py registers them for every module)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .emulation import HostEmulator, missing_requirements

WORKDIR = Path("/tmp/fleetserve-hosts-test")
FLEETSERVE = Path(sys.executable).parent / "fleetserve"


def cli(*args: str, state: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the ``fleetserve`` CLI as a user would, with its state (last hostfile, cluster) under ``state``."""
    env = {**os.environ, "FLEETSERVE_STATE_DIR": str(state), "COLUMNS": "200"}
    return subprocess.run([str(FLEETSERVE), *args], capture_output=True, text=True, timeout=timeout, env=env)


def require_emulation() -> None:
    """Skip (with the reason) where hosts cannot be emulated: not root, no unshare/ip netns/sshd."""
    why = missing_requirements()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def host_emulator() -> Iterator[HostEmulator]:
    """A bridge + client key; tests add hosts with ``add_host(i)``. Everything is removed at the end:
    every process in each host's network and PID namespaces is killed and waited for (teardown raises if
    one survives), then veths, netns, bridge."""
    require_emulation()
    # The hosts share this machine's cores: an idle vLLM CPU engine's OpenMP threads must sleep, not
    # spin, or a replica starting on another host crawls.
    emu = HostEmulator(WORKDIR, base_env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        emu.teardown()  # leftovers of a crashed earlier run
        emu.setup()
        yield emu
    finally:
        emu.teardown()


@pytest.fixture(scope="module")
def three_hosts(host_emulator: HostEmulator) -> HostEmulator:
    """Hosts fs-h1..fs-h3 (10.203.0.11-13), sshd running, keys in known_hosts."""
    for i in (1, 2, 3):
        host_emulator.add_host(i)
    return host_emulator
