"""Application builder: deployment spec -> Ray Serve app of vLLM replicas.

``deployments/*.yaml`` point Ray Serve at :func:`build_app`
(``import_path: cluster.serving.app:build_app``). Ray Serve LLM
(``ray.serve.llm``) already provides the vLLM replica, its placement group and
the OpenAI layer; this module only translates our validated spec into its
``LLMConfig`` objects and swaps in two thin subclasses:

* :class:`cluster.serving.engine.FleetLLMServer` -- checks the FlagGems switch on
  the replica's host before the engine starts, and reports which kernels run.
* :class:`cluster.serving.ingress.FleetIngress` -- adds ``/health``, 4xx
  validation of multimodal input before it reaches a replica, retries of
  requests no replica could start, and 503 + Retry-After instead of hangs.
"""

from __future__ import annotations

import copy
from typing import Any

from cluster.kernels import runtime_env_vars
from cluster.serving.placement import replica_placement
from cluster.serving.auth import load_key_digests
from cluster.serving.spec import DeploymentSpec, ServingArgs, check_endpoint_exposure, check_world_size, load_serving_args
from cluster.errors import ConfigErrors

SERVER_CLS = "cluster.serving.engine:FleetLLMServer"
NODE_INIT_CALLBACK = "cluster.serving.engine:LocalModelNodeInit"
#: A custom resource Ray puts on the head node only (``ray._common.constants.HEAD_NODE_RESOURCE_NAME``
#: in Ray 2.58.0; written out here rather than imported from a private module).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def engine_kwargs_for(spec: DeploymentSpec) -> dict[str, Any]:
    """vLLM engine kwargs: user passthrough + what the spec owns.

    The FlagGems kwargs are not here: each replica adds them at start, from the
    plan it makes on its own host (:mod:`cluster.kernels.plan`).
    """
    kwargs: dict[str, Any] = dict(spec.engine_args)
    kwargs["tensor_parallel_size"] = spec.tensor_parallel_size
    kwargs["pipeline_parallel_size"] = spec.pipeline_parallel_size
    if spec.limit_mm_per_prompt:
        kwargs["limit_mm_per_prompt"] = dict(spec.limit_mm_per_prompt)
    if spec.model.load_format != "auto":
        kwargs["load_format"] = spec.model.load_format
    if spec.model.tokenizer:
        kwargs["tokenizer"] = spec.model.tokenizer
    return kwargs


def runtime_env_for(spec: DeploymentSpec) -> dict[str, Any]:
    """The replica's runtime env; Ray hands it to every vLLM worker it spawns."""
    env = copy.deepcopy(spec.runtime_env)
    env_vars = dict(env.get("env_vars", {}))
    env_vars.update(runtime_env_vars(spec.flaggems))  # requested; the replica plans from it
    env_vars.setdefault("FLEETSERVE_DEPLOYMENT", spec.served_name)
    env_vars["FLEETSERVE_STARTUP_TIMEOUT_S"] = f"{spec.replicas.startup_timeout_s:g}"
    env["env_vars"] = env_vars
    return env


def llm_config_for(spec: DeploymentSpec) -> dict[str, Any]:
    """One ``ray.serve.llm.LLMConfig`` (as a dict) for one model spec."""
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.served_name, "model_source": spec.model.source},
        "engine_kwargs": engine_kwargs_for(spec),
        "placement_group_config": replica_placement(
            spec.pipeline_parallel_size,
            accelerator=spec.accelerator,
            cpus_per_worker=spec.cpus_per_worker,
            strategy=None if spec.placement_strategy == "auto" else spec.placement_strategy,
        ),
        "deployment_config": {
            **spec.replicas.deployment_config(spec.engine_batch),
            "ray_actor_options": {"num_cpus": spec.replica_cpus},
        },
        "runtime_env": runtime_env_for(spec),
        "server_cls": SERVER_CLS,
        "callback_config": {"callback_class": NODE_INIT_CALLBACK},
        "log_engine_metrics": spec.engine_metrics,
    }
    if spec.accelerator_type:
        config["accelerator_type"] = spec.accelerator_type
    return config


def _check_live_cluster(serving: ServingArgs) -> None:
    """When the builder runs inside a Ray cluster, check TP x PP against its nodes."""
    import ray

    if not ray.is_initialized():
        return
    gpus = [int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not any(gpus):
        return
    problems = []
    for spec in serving.models:
        problems += check_world_size(spec, gpus, "Serve application args", "", "the running Ray cluster")
    if problems:
        raise ConfigErrors(problems)


def _modalities(spec: DeploymentSpec) -> dict[str, Any]:
    """Model-card fields from config.json: ray.serve.llm says "text" unless it downloaded the checkpoint info."""
    from cluster.serving.modelcheck import input_modalities, read_config

    modalities = input_modalities(read_config(spec.model.source), spec.limit_mm_per_prompt.get("image"))
    return {"input_modality": "image" if "image" in modalities else "text", "input_modalities": modalities}


def _in_cluster_task() -> bool:
    """Whether this builder runs in a Ray worker (Serve building a config file's app), not a user's driver."""
    import ray

    if not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (``import_path: cluster.serving.app:build_app``).

    Composes the app from ray.serve.llm's public pieces (``build_llm_deployment``,
    ``make_fastapi_ingress``) rather than ``build_openai_app``, because the latter
    fixes the ingress routes and we add ``/health``.
    """
    serving = load_serving_args(args, source="Serve application args", key_prefix="args.", in_cluster=_in_cluster_task())
    _check_live_cluster(serving)
    problems = check_endpoint_exposure(serving, _serve_http_host(), "Serve application args",
                                       "args.endpoint", "Serve's http_options.host")
    if problems:
        raise ConfigErrors(problems)
    # Keys are read here, where Serve builds the app; only their digests go on.
    return compose_app(serving, api_key_digests=load_key_digests(serving.endpoint, "Serve application args"))


def _serve_http_host() -> str | None:
    """The address Serve's HTTP proxies listen on, from the running controller; None if none runs yet."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return ray.get(client._controller.get_http_config.remote()).host


def compose_app(serving: ServingArgs, api_key_digests: tuple[bytes, ...] = ()):
    if serving.data_path == "direct":
        from cluster.serving.haproxy import check_cluster_serves_direct

        check_cluster_serves_direct()  # before the direct path's imports: a cluster without HAProxy fails at once
        from cluster.serving.direct import compose_direct_app

        return compose_direct_app(serving, api_key_digests)
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.llm._internal.serve.core.ingress.ingress import init as fastapi_init
    from ray.serve.llm.ingress import make_fastapi_ingress

    from cluster.serving.auth import ApiKeyMiddleware
    from cluster.serving.ingress import FLEET_ENDPOINTS, FleetIngress
    from cluster.serving.limits import BodyLimitMiddleware, HideServerErrorsMiddleware

    configs = [llm_config_for(spec) for spec in serving.models]
    for config in configs:
        config["engine_kwargs"]["enable_log_requests"] = serving.endpoint.log_prompts
    llm_configs = [LLMConfig(**config) for config in configs]
    deployments = {c.model_id: build_llm_deployment(c) for c in llm_configs}
    cards = {spec.served_name: to_model_metadata(spec.served_name, config, overrides=_modalities(spec))
             for spec, config in zip(serving.models, llm_configs)}
    limits = {
        spec.served_name: {"max_images": spec.limit_mm_per_prompt.get("image"), "max_image_bytes": spec.max_image_bytes}
        for spec in serving.models
    }
    # Starlette runs the middleware added last first: 500s are scrubbed around
    # everything, keys are checked before the body is read, then its size.
    fastapi_app = fastapi_init()
    fastapi_app.add_middleware(BodyLimitMiddleware, max_bytes=serving.endpoint.limits.max_body_bytes)
    fastapi_app.add_middleware(ApiKeyMiddleware, digests=api_key_digests)
    fastapi_app.add_middleware(HideServerErrorsMiddleware)
    ingress = make_fastapi_ingress(FleetIngress, endpoint_map=FLEET_ENDPOINTS, app=fastapi_app)
    options = FleetIngress.get_deployment_options(llm_configs)
    options.pop("autoscaling_config", None)
    options.update(
        name="FleetIngress",
        num_replicas=serving.ingress_replicas,
        # The ingress only routes; on small hosts it must not wait for a whole CPU. It sits
        # on the head node, beside Serve's HTTP proxy (proxy_location: HeadOnly): a request
        # takes no extra network hop, and losing a GPU host never takes the ingress with it
        # (proxy -> a dead ingress is a 500 from Serve, not our 503 + Retry-After). Ray gives
        # the head node this resource; Ray Train pins its state actor the same way.
        ray_actor_options={"num_cpus": 0.1, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        max_ongoing_requests=4096,
    )
    return serve.deployment(ingress, **options).bind(
        llm_deployments=deployments,
        model_cards=cards,
        input_limits=limits,
        retry_attempts=serving.retry_attempts,
        request_timeout_s=serving.request_timeout_s,
        endpoint=serving.endpoint,
    )
