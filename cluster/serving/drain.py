"""Make Ray Serve move replicas off nodes that Ray is draining.

Serve's controller already knows how to migrate replicas away from a draining
node: it starts a replacement on another node first and only then stops the
old replica gracefully, so requests in flight finish (``DeploymentState.
migrate_replicas_on_draining_nodes``). It learns which nodes are draining from
its ``ClusterNodeInfoCache``, but the open-source default of that cache
(``DefaultClusterNodeInfoCache``) always answers "none": without this module a
drained node's replicas are only replaced after they die.

Ray offers the hook to plug in another cache: the controller imports and calls
``RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH`` right before it builds the cache
through ``ray.serve._private.controller.create_cluster_node_info_cache``.
``fleetserve up`` sets that variable on every node (see
:func:`cluster.commands.cluster_cmds.open_cluster`) to :func:`install`, which swaps the
factory for one whose cache reads the draining nodes (and their deadlines)
from the GCS -- the state ``fleetserve drain`` sets with Ray's DrainNode RPC.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("ray.serve")

#: What ``fleetserve up`` puts into RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH.
CONTROLLER_CALLBACK = "cluster.serving.drain:install"

#: The controller's loop runs every 0.1 s; the GCS is asked at most this often.
REFRESH_S = 1.0


def install() -> None:
    """Controller callback: build a drain-aware node cache instead of the default one."""
    import ray.serve._private.controller as controller
    from ray.serve._private.cluster_node_info_cache import DefaultClusterNodeInfoCache

    class DrainAwareNodeInfoCache(DefaultClusterNodeInfoCache):
        """The default cache, plus the GCS's draining nodes (node id -> deadline in ms, 0 = none)."""

        def __init__(self, gcs_client):
            super().__init__(gcs_client)
            self._draining: dict[str, int] = {}
            self._draining_read_at = 0.0

        def update(self) -> None:
            super().update()
            now = time.monotonic()
            if now - self._draining_read_at < REFRESH_S:
                return
            self._draining_read_at = now
            try:
                from ray._private.state import state

                draining = dict(state.get_draining_nodes())
            except Exception:  # keep the last answer: a GCS hiccup must not stop the control loop
                logger.warning("fleetserve: cannot read draining nodes from the GCS", exc_info=True)
                return
            alive = self.get_alive_node_ids()
            draining = {node: deadline for node, deadline in draining.items() if node in alive}
            if draining != self._draining:
                logger.info("fleetserve: draining nodes now %s", sorted(draining) or "none")
            self._draining = draining

        def get_draining_nodes(self) -> dict[str, int]:
            return dict(self._draining)

    controller.create_cluster_node_info_cache = DrainAwareNodeInfoCache
    logger.info("fleetserve: Serve controller follows Ray's node draining (replicas migrate off drained nodes)")
