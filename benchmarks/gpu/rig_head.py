"""Run on the Ray head by benchmarks/gpu/two_host_rig.py (through ``RayCluster.run_on_head``): what Ray sees.

Shipped by its source like the fleet layer's own head programs (stdlib + Ray
only), its arguments as JSON in ``argv[1]``, its answer as a ``RESULT {json}``
line. Modes:

* ``gpus``: per alive node, its resources and what a task holding all of the
  node's GPUs sees there: host name, ``CUDA_VISIBLE_DEVICES`` as Ray set it,
  Ray's GPU ids, the per-host variables (``NCCL_HOSTID`` ...) and, where torch
  finds CUDA, the devices' UUIDs -- so each emulated host's own GPUs and env are
  read back from inside Ray, not assumed.
* ``actors``: every alive actor (name, class, node, pid) and the node table, for
  the rig to find vLLM's pipeline-stage workers (named ``..._PP<stage>``).
"""

import json
import os
import socket
import sys

#: Variables whose value per host the ``gpus`` readback reports.
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "NCCL_HOSTID", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "VLLM_HOST_IP",
            "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def seen_here() -> dict:
    """What a task on this node sees (runs inside Ray's worker)."""
    import ray

    out = {"hostname": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
           "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
           "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_devices"] = [str(torch.cuda.get_device_properties(i).uuid)
                                   for i in range(torch.cuda.device_count())]
    except Exception as exc:  # torch missing or CUDA broken: say so, the rest still holds
        out["cuda_error"] = repr(exc)[:300]
    return out


def gpus(timeout: float) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(seen_here)
    nodes, refs = [], {}
    for n in ray.nodes():
        if not n["Alive"]:
            continue
        res = n.get("Resources", {})
        nodes.append({"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "gpus": res.get("GPU", 0),
                      "cpus": res.get("CPU", 0)})
        if res.get("GPU"):
            refs[n["NodeID"]] = probe.options(
                num_gpus=res["GPU"], num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    for node in nodes:
        ref = refs.get(node["node_id"])
        if ref is None:
            continue
        if ref in ready:
            try:
                node["task"] = ray.get(ref)
            except Exception as exc:
                node["task_error"] = repr(exc)[:500]
        else:
            node["task_error"] = f"the task did not run within {timeout:.0f}s (GPUs busy?)"
    return {"nodes": nodes}


def actors() -> dict:
    import ray
    from ray.util.state import list_actors

    found = list_actors(filters=[("state", "=", "ALIVE")], limit=10000, raise_on_missing_output=False)
    return {"actors": [{"name": a.name or "", "class_name": a.class_name, "node_id": a.node_id, "pid": a.pid}
                       for a in found],
            "nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}


def main() -> None:
    args = json.loads(sys.argv[1])
    import ray

    ray.init(**args["ray_init"])
    result = gpus(args.get("timeout", 60)) if args["mode"] == "gpus" else actors()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
