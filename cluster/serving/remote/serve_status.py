"""Run on the head: Serve's applications and the per-deployment summary, as ``RESULT {json}``."""

import json
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    import ray

    ray.init(**args["ray_init"])
    out = {"serve": None}
    try:
        from ray import serve

        st = serve.status()
        out["serve"] = {name: {"status": str(app.status.value if hasattr(app.status, "value") else app.status),
                               "deployments": {d: str(s.status.value if hasattr(s.status, "value") else s.status)
                                               for d, s in app.deployments.items()}}
                        for name, app in st.applications.items()}
    except Exception as exc:
        out["serve_error"] = repr(exc)
    try:  # replicas, load and autoscaling per deployment
        from cluster.serving.status import collect_serve_summary

        out["serve_summary"] = collect_serve_summary()
    except Exception as exc:
        out["serve_summary_error"] = repr(exc)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
