"""Run on the head around a node drain: may Serve's replicas leave the node, and wait until they have.

``phase=check`` (before Ray drains the node): a multi-node replica whose actor
runs elsewhere but holds bundles on the node cannot be migrated by Serve (it
would just lose its workers), so the drain is refused unless ``force``.
``phase=wait`` (after): Serve's controller sees the node draining (through
:mod:`cluster.serving.drain`) and migrates each replica whose actor runs there --
a replacement starts elsewhere first, then the old one stops gracefully,
finishing the requests it holds; this waits until none is left there.
"""

import json
import sys
import time


def result(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)
    sys.exit(0)


def serve_replicas() -> list[dict]:
    from cluster.serving.status import fetch_serve_details

    details = fetch_serve_details(timeout=30)
    return [{"app": a, "deployment": d, **r} for a, app in (details.get("applications") or {}).items()
            for d, dep in (app.get("deployments") or {}).items() for r in dep.get("replicas") or []]


def check(args: dict) -> None:
    import ray
    from ray.util.placement_group import placement_group_table

    alive = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == args["ip"]]
    if not alive:
        result(interrupted_replicas=[])  # nothing of Serve's there; the drain itself reports the missing node
    node_id = alive[0]["NodeID"]
    pgs = placement_group_table()
    split = sorted({r["replica_id"] for r in serve_replicas() if r.get("node_id") != node_id
                    for pg in pgs.values() if pg.get("name", "").endswith(r["replica_id"])
                    and node_id in pg.get("bundles_to_node_id", {}).values()})
    if split and not args["force"]:
        result(error="replicas with workers on this node run their actor elsewhere, so Serve cannot "
                     "migrate them: " + ", ".join(split), fix="stop or scale those deployments first, or pass --force "
                     "(their requests in flight fail and Serve restarts them)")
    result(interrupted_replicas=split)


def wait(args: dict) -> None:
    node_id = args["node_id"]
    print("PROGRESS draining: Serve is moving replicas off", flush=True)
    t0 = time.monotonic()
    reported = None
    while True:
        here = sorted(f"{r['deployment']}#{r['replica_id']}={r['state']}" for r in serve_replicas()
                      if r.get("node_id") == node_id)
        if here != reported:
            print("PROGRESS replicas here: " + (" ".join(here) or "none"), flush=True)
            reported = here
        if not here:
            break
        if time.monotonic() - t0 > args["timeout"]:
            result(error=f"replicas still on the node after {args['timeout']:.0f}s: {' '.join(here)}",
                   fix="the node stays marked draining (nothing new lands there) and keeps serving what it has; "
                       "run drain again with a longer --timeout, or check why the replacements do not start "
                       "(fleetserve status)")
        time.sleep(1)
    result(seconds=round(time.monotonic() - t0, 2))


def main() -> None:
    args = json.loads(sys.argv[1])
    import ray

    ray.init(**args["ray_init"])
    check(args) if args["phase"] == "check" else wait(args)


if __name__ == "__main__":
    main()
