"""The vLLM replica: ``ray.serve.llm``'s LLMServer plus the FlagGems gate.

``LLMServer`` already owns the vLLM engine (its placement group, the Ray
executor for TP x PP, the OpenAI serving layer). What it cannot know about is
the FlagGems switch: a deployment that asked for Triton kernels must fail on a
host that cannot run them (CPU-only, no Triton) with a clear message, before
minutes of model loading, and must say which kernels its workers patched. That
is what this subclass adds, with publishing that report (and a join key for
vLLM's series) as Ray metrics (:mod:`cluster.serving.metrics`) and ending the
replica when a host of its TP/PP workers is lost (``_watch_worker_nodes``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

# ray.serve.llm takes LLMConfig.callback_config but does not export the callback base class;
# this import is the one adapter for it, checked against Ray 2.58.0.
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm.deployment import LLMServer

logger = logging.getLogger("ray.serve")

#: How often a replica re-publishes its FlagGems gauges (reports change when
#: workers start, die or record calls); Ray exports every few seconds anyway.
METRICS_PERIOD_S = 10.0
#: How often a replica checks that the nodes holding its TP/PP workers are alive (one GCS read).
WORKER_NODES_PERIOD_S = 2.0


class FleetLLMServer(LLMServer):
    """LLMServer with the FlagGems host check and a status method for /health.

    ``direct``: on the direct data path (:mod:`cluster.serving.direct`) the replica is
    the HTTP endpoint and puts fleetserve's middleware on vLLM's app.
    """

    _direct: Any = None  # also for LLMServer.sync_init, which skips __init__

    async def __init__(self, llm_config: Any, *, direct: Any = None, **kwargs: Any) -> None:
        self._direct = direct
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self) -> Any:
        """vLLM's FastAPI app (ray.serve.llm's hook, called once the engine runs) plus our middleware."""
        app = await super().__serve_build_asgi_app__()
        if self._direct is not None:
            from cluster.serving.direct import install

            install(app, self, self._direct)
        return app

    async def start(self) -> None:
        from cluster.kernels import FlagGemsConfig, config_from_env, plan_kernels

        self._check_model_here()
        cfg = config_from_env(os.environ) or FlagGemsConfig()
        # This replica's one FlagGems decision, on its own host. Raises a clear error
        # (Serve marks the deployment DEPLOY_FAILED with it) when the host cannot run
        # FlagGems, unless the user asked to fall back to stock kernels.
        plan = plan_kernels(cfg, os.environ.get("FLEETSERVE_DEPLOYMENT", ""))
        for key, value in plan.engine_kwargs().items():
            # The FlagGems graph mode decides compilation/eager unless the user set it.
            self._llm_config.engine_kwargs.setdefault(key, value)
        # Before the engine starts: the engine core inherits this environment and
        # vLLM's Ray executor copies the plan to every TP/PP worker (see plan.env).
        os.environ.update(plan.env(os.environ))
        timeout_s = float(os.environ.get("FLEETSERVE_STARTUP_TIMEOUT_S", "1800"))
        try:
            await asyncio.wait_for(super().start(), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise ReplicaStartError(
                f"the vLLM engine was not up after startup_timeout_s={timeout_s:g} on {socket.gethostname()}; "
                "raise replicas.startup_timeout_s if loading legitimately takes longer"
            ) from None
        # Held on self: an unreferenced task may be garbage-collected mid-flight.
        self._metrics_task = asyncio.get_running_loop().create_task(self._publish_metrics(cfg))
        from cluster.serving.metrics import keep_engine_gauges

        self._gauges_task = asyncio.get_running_loop().create_task(keep_engine_gauges(self))
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_worker_nodes())

    async def _watch_worker_nodes(self) -> None:
        """End this replica at once when a node holding its vLLM workers is gone.

        vLLM's Ray executor does not notice a lost pipeline stage (vLLM 0.26.0, seen on
        two emulated GPU hosts): requests wait on it forever while the engine still passes
        Serve's health check, so Serve keeps routing to a replica that cannot answer.
        Exiting turns that into the failure the ingress handles: this replica's calls fail
        at once (retried, then 503 + Retry-After) and Serve starts a replacement where the
        resources are.
        """
        import ray

        nodes = await asyncio.to_thread(_other_worker_nodes)
        if not nodes:
            return  # all workers on this replica's own node: losing it ends this process anyway
        while True:
            await asyncio.sleep(WORKER_NODES_PERIOD_S)
            try:
                alive = {n["NodeID"] for n in await asyncio.to_thread(ray.nodes) if n.get("Alive")}
            except Exception:
                logger.warning("fleetserve: cannot read Ray's node table", exc_info=True)
                continue
            lost = nodes - alive
            if lost:
                logger.error("fleetserve: node(s) %s holding this replica's vLLM workers are gone; ending the "
                             "replica so that Serve replaces it and its requests fail over", ", ".join(sorted(lost)))
                os._exit(1)

    def _batch_output_stream(self, generator: Any) -> Any:
        """First chunk at once, then batched (see :mod:`cluster.serving.streaming`).

        Overrides a private hook of ray.serve.llm's LLMServer, checked against Ray 2.58.0.
        """
        from cluster.serving.streaming import EagerBatcher

        return EagerBatcher(generator, (self._get_batch_interval_ms() or 0) / 1000).stream()

    def _check_model_here(self) -> None:
        """Fail in seconds, naming the host, on what no retry can fix (see :mod:`modelcheck`)."""
        from cluster.serving.modelcheck import parallelism_problems, read_config

        source = self._llm_config.model_loading_config.model_source
        host = f"{socket.gethostname()} ({_node_ip()})"
        if not os.path.isdir(source):
            raise ReplicaStartError(
                f"model.source {source!r} is not a directory on {host}; the model must be at that path on every "
                "GPU host (a shared filesystem, or copied there)")
        config = read_config(source)
        if config is None:
            raise ReplicaStartError(f"model.source {source!r} on {host} has no readable config.json")
        kwargs = self._llm_config.engine_kwargs
        problems = parallelism_problems(
            config, int(kwargs.get("tensor_parallel_size", 1)), int(kwargs.get("pipeline_parallel_size", 1)))
        if problems:
            raise ReplicaStartError("; ".join(f"{key}: {problem} (fix: {fix})" for key, problem, fix in problems))

    async def _publish_metrics(self, cfg: Any) -> None:
        """Keep this replica's FlagGems gauges current; never lets the replica fail."""
        from cluster.kernels import collect_reports
        from cluster.serving.metrics import ReplicaMetrics, vllm_replica_id

        deployment = os.environ.get("FLEETSERVE_DEPLOYMENT", "")
        try:
            metrics = ReplicaMetrics(deployment, vllm_replica_id(), os.environ.get("VLLM_HOST_IP") or _node_ip())
        except Exception:
            logger.exception("fleetserve: replica metrics unavailable")
            return
        while True:
            try:
                # Reads files and Ray's KV: off the event loop that streams tokens.
                report = await asyncio.to_thread(collect_reports, deployment)
                metrics.update(report, cfg.enabled, list(cfg.selected_ops()))
            except Exception:
                logger.warning("fleetserve: cannot publish FlagGems metrics", exc_info=True)
            await asyncio.sleep(METRICS_PERIOD_S)

    async def fleet_status(self) -> dict[str, Any]:
        """Liveness plus where this replica runs and what its workers report."""
        await self.check_health()
        return self.replica_report()

    def replica_report(self) -> dict[str, Any]:
        """Where this replica runs and what its workers report (reads files and Ray's KV: call off the loop)."""
        from cluster.kernels import collect_reports

        return {
            "model_source": self._llm_config.model_loading_config.model_source,
            "replica_host": socket.gethostname(),
            "node_ip": os.environ.get("VLLM_HOST_IP") or _node_ip(),
            "flaggems": collect_reports(os.environ.get("FLEETSERVE_DEPLOYMENT", "")),
        }


class LocalModelNodeInit(CallbackBase):
    """Skips ray.serve.llm's per-node model "download" for a model that is a local directory.

    For a local path those tasks download nothing (Ray 2.58.0's ``download_model_files``
    returns the path as given), yet each starts a fresh Ray worker on every node of the
    replica's placement group that imports torch and transformers: 34 s of a 7B replica's
    start on 2 x H100 (the two-host rig's Serve log). The directory itself is checked on
    the replica's host by ``FleetLLMServer._check_model_here``; a host without it fails in
    vLLM's worker with the path in the error.
    """

    async def on_before_node_init(self) -> None:
        if os.path.isdir(self.llm_config.model_loading_config.model_source):
            self.ctx.run_init_node = False


class ReplicaStartError(RuntimeError):
    """A replica that cannot start because of its config; Serve shows the message in the deployment status."""


def _other_worker_nodes() -> set[str]:
    """Node IDs of this replica's placement group (its vLLM workers' bundles) other than its own node."""
    import ray

    pg = ray.util.get_current_placement_group()
    if pg is None:
        return set()
    nodes = {node for node in ray.util.placement_group_table(pg).get("bundles_to_node_id", {}).values() if node}
    return nodes - {ray.get_runtime_context().get_node_id()}


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return ""
