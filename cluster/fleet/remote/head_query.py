"""Run on the head: the cluster as Ray sees it (its node table), as ``RESULT {json}``.

With ``wait_for`` it polls until those node IPs are alive, printing ``JOINED ip``
as each one joins. Needs only Ray on the head.
"""

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def answers(node: dict) -> bool:
    # The GCS marks a node dead only after its health checks fail for ~30 s; the
    # raylet's port says at once whether it is there (refused: gone; timeout: cut off).
    try:
        socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=2).close()
        return True
    except OSError:
        return False


def nodes() -> list[dict]:
    import ray

    table = ray.nodes()
    with ThreadPoolExecutor(max_workers=32) as pool:  # cut-off nodes cost 2 s each: ask all at once
        up = list(pool.map(lambda n: bool(n["Alive"]) and answers(n), table))
    return [{"ip": n["NodeManagerAddress"], "alive": a, "gcs_alive": n["Alive"], "node_id": n["NodeID"],
             "resources": n.get("Resources", {}), "labels": n.get("Labels", {}) or {}} for n, a in zip(table, up)]


def main() -> None:
    args = json.loads(sys.argv[1])
    gcs_host, gcs_port = args["address"].rsplit(":", 1)
    try:  # ray.init retries a dead GCS for minutes: ask the port first
        socket.create_connection((gcs_host, int(gcs_port)), timeout=5).close()
    except OSError as exc:
        print(f"no Ray GCS answers at {args['address']}: {exc}", flush=True)
        sys.exit(3)
    import ray

    ray.init(**args["ray_init"])
    exclude = set(args.get("exclude") or [])
    wait_for = set(args.get("wait_for") or [])
    deadline = time.monotonic() + args.get("timeout", 0)
    seen = set()
    while wait_for:
        alive = {n["ip"] for n in nodes() if n["alive"] and n["node_id"] not in exclude}
        for ip in sorted((alive & wait_for) - seen):
            print("JOINED " + ip, flush=True)
            seen.add(ip)
        if wait_for <= alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print("RESULT " + json.dumps({"nodes": nodes()}), flush=True)


if __name__ == "__main__":
    main()
