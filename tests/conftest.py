"""Shared fixtures: a tiny random-weight model made locally, a local Ray cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tinyqwen2 import local_ray

# The emulated hosts' fixtures (host_emulator, three_hosts), for every module that asks for them.
pytest_plugins = ["hosts.fixtures"]

MODEL_CACHE = Path(os.environ.get("FLEETSERVE_TEST_MODELS", Path.home() / ".cache/fleetserve/test-models"))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Tiny Qwen2.5-VL (real architecture, random weights), made once per machine."""
    from cluster.modelgen import make_model

    out = MODEL_CACHE / "tiny-qwen2_5_vl"
    if not (out / "config.json").exists() or not any(out.glob("*.safetensors")):
        make_model("qwen2_5_vl", "tiny", out, seed=0)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A fresh single-node Ray cluster for one test module.

    Ray gets more logical CPUs than the machine has cores: on 2 cores the vLLM
    replica bundles would otherwise leave no room for Serve's ingress.
    """
    with local_ray() as ray:
        yield ray


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scale-out module last: scripts/test.sh runs the emulated-host modules beside the rest, and
    its four engine starts under load go best once the other stream's engines are done."""
    items.sort(key=lambda item: item.path.name == "test_fleet_hosts.py")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Disconnect a Ray driver a module left behind, while the interpreter is still whole."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    session.config.stash[_SESSION] = session


_SESSION = pytest.StashKey[pytest.Session]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with pytest's status once its report is written, without interpreter finalization.

    This process has started and shut down Ray, vLLM and gRPC many times; their native threads can
    outlive a shutdown and crash finalization (seen once in CI as a segfault after '346 passed';
    ray-project/ray#31145 is the known class). The terminal summary and any junit file are written
    by now; what is skipped is atexit handlers and pytest's last sweep for unraisable exceptions,
    which this suite does not use (no coverage run, no in-process ``pytest.main`` caller).
    """
    if _SESSION in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(config.stash[_SESSION].exitstatus))
