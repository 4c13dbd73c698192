"""What the direct data path needs of the Ray cluster: Ray Serve's HAProxy ingress, chosen when Ray starts.

Apart from :mod:`cluster.serving.direct`, which imports vLLM's request models
(seconds): the app builder checks the cluster before that import, so a cluster
that cannot serve the path fails the deploy at once, and ``fleetserve serve``
reads the settings for its own local head without the import.
"""

from __future__ import annotations

from cluster.errors import ConfigError

#: Cluster settings the direct path needs, set in ``ray start``'s environment on every node
#: (the hostfile's ``env:``; ``fleetserve serve`` sets them on its own local head).
CLUSTER_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # HAProxy's default (20000) asks for more open files than many hosts allow (it then fails to start).
    "RAY_SERVE_HAPROXY_MAXCONN": "4096",
}


def check_cluster_serves_direct() -> None:
    """Raise a :class:`ConfigError` naming the fix unless this Ray cluster runs Serve's HAProxy ingress
    (read where the app is built: Serve's constants come from the cluster's environment)."""
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_HA_PROXY:
        raise ConfigError(
            "Serve application args", "args.data_path",
            "the Ray cluster runs Serve's Python proxy; the direct data path needs its HAProxy ingress",
            "start the cluster with " + " ".join(f"{k}={v}" for k, v in CLUSTER_ENV.items()) + " in ray start's "
            "environment on every node (hostfile env:, then fleetserve up; fleetserve serve sets them on its own "
            "local head), or use data_path: ingress")
