"""Placement of one vLLM replica's GPU workers (TP x PP) on Ray nodes.

Goal: each pipeline stage on one node (its tensor-parallel group never crosses
a node, so TP all-reduces stay on NVLink), while stages may span nodes.

How that maps onto Ray 2.58 + ray.serve.llm (investigated in the installed
sources, see docs/cluster.md):

* vLLM's Ray executor starts **one worker per placement-group bundle that holds
  an accelerator**, then numbers the workers node by node (driver's node first,
  then by node id; ``vllm.v1.executor.ray_utils.get_bundles_sorted_by_node``),
  and rank ``r`` belongs to PP stage ``r // tp``. So a stage stays on one node
  exactly when **every node holds a multiple of ``tp`` of the replica's GPU
  bundles**. Bundles must stay one per GPU worker; a single ``{GPU: tp}``
  bundle per stage would make vLLM start ``pp`` workers instead of ``tp*pp``.
* ``LLMConfig.placement_group_config`` carries only ``bundles`` + ``strategy``
  (ray.serve.llm's ``PlacementGroupConfig``); Ray's newer per-bundle
  ``bundle_label_selector`` and ``topology_strategy`` are not passed through, and
  neither can say "these ``tp`` bundles together" anyway (label selectors pin
  bundles to fixed node labels, not to each other).
* Hence: ``pp == 1`` -> ``STRICT_PACK`` (the whole TP group on one node,
  guaranteed by Ray). ``pp > 1`` -> ``PACK`` with uniform per-worker bundles:
  Ray's PACK scheduler fills the node with the most room before moving on, so
  on nodes whose free GPUs are multiples of ``tp`` (whole 8-GPU hosts, or
  hosts used only by replicas of one TP size) each node gets whole stages.
  When fragmentation could split a stage, :func:`check_stage_locality` on the
  placement group's ``bundles_to_node_id`` says so (naming stage and nodes);
  the integration test reads the placement back with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.errors import FleetserveError

class PlacementError(FleetserveError):
    """A replica's bundles landed so that a pipeline stage spans nodes."""


def replica_placement(
    pipeline_parallel_size: int,
    accelerator: str = "GPU",
    cpus_per_worker: float = 1.0,
    strategy: str | None = None,
) -> dict[str, Any]:
    """``LLMConfig.placement_group_config`` for one replica: Ray's own bundles, our strategy.

    ray.serve.llm expands ``bundle_per_worker`` into one bundle per TP x PP
    worker from the engine kwargs (the parallel sizes are given to Ray once,
    there); only the strategy is decided here: ``STRICT_PACK`` for ``pp == 1``,
    ``PACK`` otherwise (see the module docstring), unless the spec names one.
    The spec has validated every value.
    """
    bundle: dict[str, float] = {"CPU": cpus_per_worker} if accelerator == "CPU" else {accelerator: 1, "CPU": cpus_per_worker}
    return {"bundle_per_worker": bundle,
            "strategy": strategy or ("STRICT_PACK" if pipeline_parallel_size == 1 else "PACK")}


def worker_layout(
    bundles: Sequence[Mapping[str, float]],
    bundle_nodes: Mapping[int, str] | Sequence[str],
    driver_node: str | None,
    accelerator: str = "GPU",
) -> list[tuple[int, str]]:
    """``(bundle_index, node)`` per vLLM rank, in the order vLLM's Ray executor numbers them.

    Mirrors ``get_bundles_sorted_by_node``: bundles holding the accelerator,
    the driver's node first, then by node id (stable within a node).
    """
    nodes = dict(enumerate(bundle_nodes)) if not isinstance(bundle_nodes, Mapping) else dict(bundle_nodes)
    workers = [(i, nodes[i]) for i, b in enumerate(bundles) if b.get(accelerator)]
    return sorted(workers, key=lambda w: (0 if w[1] == driver_node else 1, w[1]))


def stage_nodes(layout: Sequence[tuple[int, str]], tensor_parallel_size: int) -> list[set[str]]:
    """The set of nodes each pipeline stage's workers run on (rank // tp = stage)."""
    stages: list[set[str]] = []
    for rank, (_, node) in enumerate(layout):
        if rank % tensor_parallel_size == 0:
            stages.append(set())
        stages[-1].add(node)
    return stages


def check_stage_locality(
    bundles: Sequence[Mapping[str, float]],
    bundle_nodes: Mapping[int, str] | Sequence[str],
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    driver_node: str | None = None,
    accelerator: str = "GPU",
) -> list[set[str]]:
    """Raise :class:`PlacementError` unless every stage is on one node; returns each stage's node.

    ``bundle_nodes`` is ``placement_group_table(pg)["bundles_to_node_id"]``.
    """
    layout = worker_layout(bundles, bundle_nodes, driver_node, accelerator)
    world = tensor_parallel_size * pipeline_parallel_size
    if len(layout) != world:
        raise PlacementError(f"{len(layout)} {accelerator} bundles for a {tensor_parallel_size}x{pipeline_parallel_size} replica "
                             f"(vLLM needs {world}, one per worker)")
    per_node = Counter(node for _, node in layout)
    stages = stage_nodes(layout, tensor_parallel_size)
    split = [(i, s) for i, s in enumerate(stages) if len(s) > 1]
    if split:
        detail = "; ".join(f"stage {i} on {', '.join(sorted(s))}" for i, s in split)
        counts = ", ".join(f"{node}: {n}" for node, n in per_node.items())
        raise PlacementError(f"tensor-parallel group crosses nodes: {detail} (workers per node: {counts}; each node "
                             f"needs a multiple of tp={tensor_parallel_size}). Free whole groups of {tensor_parallel_size} "
                             "GPUs per node, or use pp=1 (STRICT_PACK).")
    return stages
