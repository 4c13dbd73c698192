"""Replica metrics that Ray exports on its Prometheus endpoint next to vLLM's.

vLLM's own engine metrics reach Ray already: ``log_engine_metrics: True`` makes
``ray.serve.llm`` hand vLLM its ``RayPrometheusStatLogger``, whose series come
out as ``ray_vllm_*`` (e.g. ``ray_vllm_num_requests_running``,
``ray_vllm_kv_cache_usage_perc``, ``ray_vllm_time_to_first_token_seconds``)
with the labels ``model_name`` (our served name) and ``ReplicaId`` (the Serve
replica's id). What Ray cannot know is the FlagGems op report, and vLLM's
series do not carry Serve's ``deployment``/``replica`` labels. This module adds
both as Serve metrics (``ray.serve.metrics.Gauge`` stamps ``deployment``,
``replica`` and ``application`` on every series):

* ``fleetserve_flaggems_ops{model, op, status}`` -- how many of the replica's
  vLLM processes have ``op`` in ``status`` (patched / skipped / failed ...);
* ``fleetserve_flaggems_status{model, status}`` -- 1 for the replica's overall
  FlagGems state (active / fallback / failed / disabled);
* ``fleetserve_flaggems_op_calls{model, op}`` -- calls recorded with
  ``flaggems.record: true``;
* ``fleetserve_replica_info{model, ReplicaId, node_ip, host}`` = 1 -- an info
  series to join vLLM's series onto Serve's labels in PromQL:
  ``ray_vllm_num_requests_running * on(ReplicaId) group_left(deployment, replica)
  ray_fleetserve_replica_info``.

Ray prefixes every exported name with ``ray_``; :data:`EXPORTED` lists the
names as they appear on the endpoint.

vLLM sets its scheduler gauges (running, waiting, KV cache) only when its engine
core returns a step's outputs, i.e. only while requests run; Ray 2.58 drops a
gauge series that was not recorded within two export intervals
(``metrics_report_interval_ms``, 10 s by default). So on an idle replica, and
before its first request, those series were simply absent (``fleetserve
status`` showed "-"). :func:`keep_engine_gauges` records the idle state
through vLLM's own stat loggers while the engine has no request -- nothing
vLLM or Ray offers does that.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

logger = logging.getLogger("ray.serve")

#: vLLM engine series (as exported by Ray) the dashboard and tests rely on.
VLLM_SERIES = {
    "running": "ray_vllm_num_requests_running",
    "waiting": "ray_vllm_num_requests_waiting",
    "kv_cache": "ray_vllm_kv_cache_usage_perc",
    "ttft": "ray_vllm_time_to_first_token_seconds",
    "tpot": "ray_vllm_request_time_per_output_token_seconds",
    "generation_tokens": "ray_vllm_generation_tokens_total",
    "prompt_tokens": "ray_vllm_prompt_tokens_total",
    "e2e_latency": "ray_vllm_e2e_request_latency_seconds",
    "finished": "ray_vllm_request_success_total",
}
#: fleetserve's own series (as exported by Ray).
FLEET_SERIES = {
    "flaggems_ops": "ray_fleetserve_flaggems_ops",
    "flaggems_status": "ray_fleetserve_flaggems_status",
    "flaggems_op_calls": "ray_fleetserve_flaggems_op_calls",
    "replica_info": "ray_fleetserve_replica_info",
}
EXPORTED = {**VLLM_SERIES, **FLEET_SERIES}

FLAGGEMS_STATES = ("active", "fallback", "failed", "disabled", "none")


class ReplicaMetrics:
    """The gauges of one vLLM replica; create it inside the Serve replica.

    Gauges keep their last value, so a state that went away (an op no longer
    ``failed``) is set back to 0 rather than left at its old value.
    """

    def __init__(self, model: str, vllm_replica_id: str, node_ip: str) -> None:
        from ray.serve.metrics import Gauge

        self.model = model
        self._ops = Gauge("fleetserve_flaggems_ops", "vLLM processes of this replica with the FlagGems op in this "
                          "status (patched = runs as a Triton kernel)", tag_keys=("model", "op", "status"))
        self._status = Gauge("fleetserve_flaggems_status", "1 for this replica's FlagGems state",
                             tag_keys=("model", "status"))
        self._calls = Gauge("fleetserve_flaggems_op_calls", "FlagGems kernel calls recorded (flaggems.record)",
                            tag_keys=("model", "op"))
        self._info = Gauge("fleetserve_replica_info",
                           "1 per live vLLM replica; joins vLLM's ReplicaId to Serve's labels",
                           tag_keys=("model", "ReplicaId", "node_ip", "host"))
        self._info_tags = {"model": model, "ReplicaId": vllm_replica_id, "node_ip": node_ip,
                           "host": socket.gethostname()}
        self._info.set(1, tags=self._info_tags)
        self._seen_ops: set[tuple[str, str]] = set()

    def update(self, report: dict[str, Any], enabled: bool, requested_ops: list[str]) -> None:
        """Publish one :func:`cluster.kernels.collect_reports` result (and re-record the info series)."""
        # Re-recorded each period: Ray drops a gauge that is not recorded within two export intervals.
        self._info.set(1, tags=self._info_tags)
        status = report["summary"]["status"] if enabled else "disabled"
        for state in FLAGGEMS_STATES:
            self._status.set(1 if state == status else 0, tags={"model": self.model, "status": state})
        counts: dict[tuple[str, str], int] = {}
        calls: dict[str, float] = {}
        for proc in report.get("processes", []):
            for op, res in proc.get("ops", {}).items():
                key = (op, str(res.get("status", "unknown")))
                counts[key] = counts.get(key, 0) + 1
            for op, n in (proc.get("calls") or {}).items():
                calls[op] = calls.get(op, 0) + float(n)
        if not enabled:
            # Stock kernels everywhere: say so per op, so a panel never shows "no data".
            counts = {(op, "stock"): 1 for op in requested_ops}
        for key in self._seen_ops - counts.keys():
            self._ops.set(0, tags={"model": self.model, "op": key[0], "status": key[1]})
        for (op, state), n in counts.items():
            self._ops.set(n, tags={"model": self.model, "op": op, "status": state})
        self._seen_ops |= counts.keys()
        for op, n in calls.items():
            self._calls.set(n, tags={"model": self.model, "op": op})


def vllm_replica_id() -> str:
    """The id vLLM's Ray stat logger puts in ``ReplicaId`` (the Serve replica's unique id)."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""


def record_idle_engine_state(engine_client: Any) -> bool:
    """If the vLLM engine has no request, record that state on its Prometheus stat loggers.

    An engine without requests is exactly an empty scheduler: nothing running, nothing
    waiting, and no KV blocks held (vLLM counts freed blocks as free even while they stay
    prefix-cached). Returns False, recording nothing, while a request is in the engine:
    then vLLM records the true state after every step itself. Runs on the replica's event
    loop, the one vLLM's output handler records on, so the check and the record cannot
    interleave with a step's record.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    manager = engine_client.logger_manager
    if manager is None or engine_client.output_processor.has_unfinished_requests():
        return False
    for stat_logger in manager.stat_loggers:
        # Only the Prometheus loggers (Ray's is a subclass): the console logger would report a step.
        if isinstance(stat_logger, PrometheusStatLogger):
            for engine_idx in manager.engine_indexes:
                stat_logger.record(scheduler_stats=SchedulerStats(), iteration_stats=None, engine_idx=engine_idx)
    return True


def gauge_refresh_period_s() -> float:
    """Half of Ray's export interval: every export then carries a value younger than Ray's gauge TTL."""
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 2000


async def keep_engine_gauges(server: Any) -> None:
    """Keep an ``LLMServer``'s vLLM scheduler gauges on Ray's endpoint while it idles (see module doc).

    Reads ``server.engine._engine_client`` (ray.serve.llm's VLLMEngine holds vLLM's AsyncLLM
    there; checked against Ray 2.58.0). Never lets the replica fail: a problem is logged once
    and the loop ends.
    """
    period = gauge_refresh_period_s()
    # Started after LLMServer.start(): the engine client exists, unless Ray moved it.
    engine_client = getattr(getattr(server, "engine", None), "_engine_client", None)
    if engine_client is None:
        logger.warning("fleetserve: no vLLM engine client on this LLMServer; idle replicas will show no "
                       "running/waiting/KV-cache series")
        return
    while True:
        try:
            record_idle_engine_state(engine_client)
        except Exception:
            logger.warning("fleetserve: cannot keep vLLM's idle gauges on the metrics endpoint", exc_info=True)
            return
        await asyncio.sleep(period)
