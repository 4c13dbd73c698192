"""Run on the head: ask Ray's GCS to drain the node at one IP; ``RESULT {"node_id": ...}`` or ``{"error": ...}``.

A draining node takes no new tasks, actors or placement groups; what runs there
keeps running. Moving a workload off it is the caller's business (for Serve:
:mod:`cluster.serving.remote.drain_wait`), as is stopping Ray there afterwards.
"""

import json
import sys
import time


def gcs_drain_node(address: str, node_id: str, deadline_ms: int) -> tuple[bool, str]:
    """Adapter for Ray's private DrainNode RPC (checked against Ray 2.58.0).

    No public API drains a node: ``ray drain-node`` calls the same client and is
    documented as outside Ray's stability guarantees.
    """
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address)
    return gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                          "fleetserve drain", deadline_ms)


def result(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)
    sys.exit(0)


def main() -> None:
    args = json.loads(sys.argv[1])
    import ray

    ray.init(**args["ray_init"])
    alive = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == args["ip"]]
    if not alive:
        result(error=f"no alive Ray node at {args['ip']}")
    node_id = alive[0]["NodeID"]
    accepted, why = gcs_drain_node(args["address"], node_id, int(time.time() * 1000 + args["timeout"] * 1000))
    if not accepted:
        result(error=f"Ray refused to drain the node: {why}")
    result(node_id=node_id)


if __name__ == "__main__":
    main()
