"""Deployment spec: the typed, validated ``args:`` of a Ray Serve config file.

A user writes ``deployments/<name>.yaml`` (a plain Ray Serve config); each
application's ``args:`` is one :class:`DeploymentSpec` (or ``models:``, a list
of them served behind one OpenAI endpoint). The spec is the single source the
app builder turns into ``ray.serve.llm`` objects, so every check a user can get
wrong -- parallelism vs. host GPUs, engine-arg names, multimodal limits -- lives
here and reports the file, the key and the fix.

String values may use ``${VAR}`` / ``${VAR:-default}`` so one file can point at
a model path or switch to dummy weights from the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.errors import ConfigError, ConfigErrors, pydantic_errors
from cluster.kernels.config import FlagGemsConfig

# Engine args the spec owns at top level: setting them under engine_args would
# let the two disagree, so they are refused there with a pointer to the key.
SPEC_OWNED_ENGINE_ARGS = {
    "model": "model.source",
    "served_model_name": "model.served_name",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "limit_mm_per_prompt": "limit_mm_per_prompt",
    "load_format": "model.load_format",
    "distributed_executor_backend": "(chosen by fleetserve: Ray for TP x PP > 1)",
    "enable_log_requests": "endpoint.log_prompts",
}

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnresolvedReference(KeyError):
    """A ``${VAR}`` that cannot be resolved where the expansion runs."""

    def __init__(self, name: str, has_default: bool):
        super().__init__(name)
        self.name, self.has_default = name, has_default


def expand_env(value: Any, environ: dict[str, str] | None = None, defaults_allowed: bool = True) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a YAML tree.

    ``defaults_allowed=False`` is for expansion inside the Ray cluster (Serve
    builds a config file's apps in a cluster task): there a default stands in
    for a variable the user may well have set in the shell that ran ``serve
    run``, so taking it would silently serve something else.
    """
    env = os.environ if environ is None else environ
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None and defaults_allowed:
                return default
            raise UnresolvedReference(name, default is not None)

        full = _ENV_REF.fullmatch(value)
        out = _ENV_REF.sub(sub, value)
        # A whole-value reference like "${DUMMY:-false}" becomes a YAML scalar
        # again so booleans and numbers keep their type.
        return yaml.safe_load(out) if full and out.strip() else out
    if isinstance(value, dict):
        return {k: expand_env(v, env, defaults_allowed) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, defaults_allowed) for v in value]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSource(_Strict):
    """Where the weights, config and tokenizer come from."""

    source: str = Field(description="Local model directory (or a path on every host).")
    served_name: str | None = Field(default=None, description="Name clients use in `model`; default: directory name.")
    load_format: Literal["auto", "safetensors", "pt", "dummy"] = Field(
        default="auto", description="`dummy` runs the real architecture with random weights (dry runs, benchmarks)."
    )
    tokenizer: str | None = None

    @field_validator("source", "tokenizer")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        # Replicas run in Ray's working dirs, so "~" must be resolved here.
        return os.path.expanduser(value) if value else value

    @property
    def name(self) -> str:
        return self.served_name or Path(self.source.rstrip("/")).name


class Autoscaling(_Strict):
    """Serve autoscaling for the vLLM replicas of one model."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=16, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas}); "
                "set max_replicas >= min_replicas"
            )
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class Replicas(_Strict):
    """Either a fixed replica count or an autoscaling block."""

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int | None = Field(
        default=None, ge=1,
        description="Requests Serve admits into one replica; default: what its engine batches (max_num_seqs).",
    )
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    startup_attempts: int = Field(
        default=2, ge=1,
        description="Replica starts Serve tries before it marks the deployment DEPLOY_FAILED and stops trying.",
    )
    startup_timeout_s: float = Field(
        default=1800.0, gt=0, description="A replica whose engine is not up by then fails (and counts as an attempt).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> Replicas:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return self

    def deployment_config(self, engine_batch: int) -> dict[str, Any]:
        """Serve's deployment options; ``engine_batch``: how many sequences the engine batches."""
        cfg: dict[str, Any] = {
            # Fewer would cap the engine's batch below what it can run (measured: 78% of plain vLLM at c=128).
            "max_ongoing_requests": self.max_ongoing_requests or engine_batch,
            "max_constructor_retry_count": self.startup_attempts,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            a = self.autoscaling
            auto: dict[str, Any] = {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
            }
            if a.initial_replicas is not None:
                auto["initial_replicas"] = a.initial_replicas
            cfg["autoscaling_config"] = auto
        else:
            cfg["num_replicas"] = self.num_replicas or 1
        return cfg


def parse_mm_limits(value: Any) -> dict[str, int]:
    """Accept ``{image: 18}`` or the seeds' ``"image=18,video=1"`` form."""
    if value is None:
        return {}
    if isinstance(value, str):
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, num = part.partition("=")
            if not sep or not key.strip() or not num.strip().isdigit():
                raise ValueError(
                    f"cannot read {part!r}; write limits as `image=18,video=1` or as a mapping {{image: 18}}"
                )
            out[key.strip()] = int(num)
        value = out
    if not isinstance(value, dict):
        raise ValueError("must be a mapping like {image: 18} or a string like `image=18`")
    limits: dict[str, int] = {}
    for key, num in value.items():
        if key not in ("image", "video", "audio"):
            raise ValueError(f"unknown modality {key!r}; use image, video or audio")
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"limit for {key!r} must be a non-negative integer, got {num!r}")
        limits[key] = num
    return limits


@functools.lru_cache(maxsize=1)
def vllm_engine_arg_names() -> frozenset[str]:
    """Names vLLM's AsyncEngineArgs accepts (imported lazily: vLLM is heavy)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


class DeploymentSpec(_Strict):
    """One model served by vLLM replicas under Ray Serve."""

    model: ModelSource
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    accelerator: Literal["GPU", "CPU"] = "GPU"
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type, e.g. H100.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Logical CPUs Ray reserves per vLLM worker.")
    replica_cpus: float = Field(default=1.0, gt=0, description="Logical CPUs for the replica actor itself.")
    placement_strategy: Literal["auto", "PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "auto"
    replicas: Replicas = Field(default_factory=Replicas)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=dict)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    flaggems: FlagGemsConfig = Field(default_factory=FlagGemsConfig)
    engine_metrics: bool = Field(
        default=True,
        description="Export vLLM's engine metrics through Ray's metrics agent (ray.serve.llm's "
                    "log_engine_metrics): the ray_vllm_* series, the engine columns of `fleetserve status` "
                    "and the dashboard's engine panels. Off saves the replica Ray's per-step metric updates.")

    @field_validator("limit_mm_per_prompt", mode="before")
    @classmethod
    def _mm(cls, value: Any) -> dict[str, int]:
        return parse_mm_limits(value)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas_shorthand(cls, value: Any) -> Any:
        return {"num_replicas": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in SPEC_OWNED_ENGINE_ARGS:
                raise ValueError(
                    f"`{key}` is set by the spec, not under engine_args; use `{SPEC_OWNED_ENGINE_ARGS[key]}` instead"
                )
        known = vllm_engine_arg_names()
        unknown = [k for k in value if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"`{k}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
            raise ValueError(
                "unknown vLLM engine arg " + ", ".join(hints) + "; see `vllm serve --help` for vLLM 0.26's names"
            )
        return value

    @model_validator(mode="after")
    def _metrics_need_stats(self) -> DeploymentSpec:
        if self.engine_metrics and self.engine_args.get("disable_log_stats"):
            raise ValueError("engine_args.disable_log_stats: true leaves engine_metrics nothing to export; "
                             "drop it, or set engine_metrics: false as well")
        return self

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, value: dict[str, Any]) -> dict[str, Any]:
        env_vars = value.get("env_vars", {})
        if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
            raise ValueError("runtime_env.env_vars must map names to strings (quote numbers: \"1\")")
        return value

    @property
    def served_name(self) -> str:
        return self.model.name

    @property
    def engine_batch(self) -> int:
        """Sequences one engine batches: ``max_num_seqs``, else vLLM 0.26's default for the accelerator.

        vLLM's API-server default is 1024 on >= 70 GiB GPUs (H100/H200), 256 on
        smaller ones and 128 x world size on CPU; on GPU the larger is taken, since
        admitting more than the engine batches only queues them in the engine.
        """
        if self.engine_args.get("max_num_seqs"):
            return int(self.engine_args["max_num_seqs"])
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        return 128 * world if self.accelerator == "CPU" else 1024


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback_host(host: str | None) -> bool:
    """True when an HTTP listen address is reachable only from the machine itself."""
    import ipaddress

    host = (host or "127.0.0.1").strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MediaPolicy(_Strict):
    """How the ingress fetches ``image_url`` http(s) URLs (vLLM never fetches them itself)."""

    allowed_domains: list[str] = Field(
        default_factory=list,
        description="Hosts images may come from (`example.com`, `*.example.com`); empty: any public host.",
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the non-public address denial (e.g. an internal image store). "
        "Loopback, private, link-local, multicast, reserved and cloud-metadata addresses are denied otherwise.",
    )
    fetch_timeout_s: float = Field(default=10.0, gt=0, le=60, description="One total deadline per image.")
    max_redirects: int = Field(default=3, ge=0, le=10, description="Each hop is checked again; 0: redirects refused.")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Width x height limit, checked from the header before decoding.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR; write e.g. 10.1.2.0/24 or 127.0.0.1/32") from None
        return value

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            d = domain.strip().lower().rstrip(".")
            if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", d):
                raise ValueError(f"{domain!r} is not a host name; write example.com or *.example.com")
            out.append(d)
        return out


class RequestLimits(_Strict):
    """Per-request bounds the ingress enforces before a replica sees the request."""

    max_n: int = Field(default=8, ge=1, description="Largest `n` (and `best_of`) a request may ask for.")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Largest `max_tokens`, and the value a request without one gets; "
                    "default: only the model's context length bounds it.",
    )
    max_body_bytes: int = Field(default=64 << 20, gt=0, description="Larger request bodies are answered 413.")
    max_queued_requests: int = Field(
        default=256, ge=1,
        description="Requests in flight per model and ingress replica; beyond it 503 + Retry-After at once.",
    )


class EndpointSpec(_Strict):
    """Who may use the OpenAI endpoint and what one request may cost.

    API keys never sit in the YAML: ``api_keys_env`` names an environment
    variable and ``api_keys_file`` a file (one key per line). Both are read
    where Serve builds the app (see docs/security.md), and only their SHA-256
    digests reach the ingress.
    """

    api_keys_env: str | None = Field(default=None, description="Name of an env var holding keys (comma/newline separated).")
    api_keys_file: str | None = Field(default=None, description="File with one key per line (# comments).")
    allow_unauthenticated: bool = Field(
        default=False, description="Serve without keys on a non-loopback address, on purpose.",
    )
    log_prompts: bool = Field(default=False, description="Let vLLM log each request's prompt (off: prompts stay out of logs).")
    media: MediaPolicy = Field(default_factory=MediaPolicy)
    limits: RequestLimits = Field(default_factory=RequestLimits)

    @field_validator("api_keys_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                "must be the NAME of an environment variable (e.g. FLEETSERVE_API_KEYS), never a key itself"
            )
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _key_path(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value else value

    @property
    def has_keys(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


def check_endpoint_exposure(serving: ServingArgs, host: str | None, source: Any, key: str,
                            host_key: str) -> list[ConfigError]:
    """A deployment listening beyond loopback must have API keys, or say on purpose that it has none.

    ``host``: where Serve's HTTP proxy listens (``host_key`` names that setting). On the
    direct data path the replicas' own HTTP ports are the endpoint too, and across nodes
    HAProxy must reach them: Ray binds them on every interface by default then, so the
    path is treated as beyond loopback whatever ``host`` says.
    """
    endpoint = serving.endpoint
    if serving.data_path == "direct":
        host, host_key = "0.0.0.0", ("the replicas' HTTP ports: with data_path direct HAProxy on any node must "
                                     "reach them, on every interface by default")
    if endpoint.has_keys or endpoint.allow_unauthenticated or is_loopback_host(host):
        return []
    return [ConfigError(
        source, key,
        f"the endpoint listens on {host} ({host_key}), beyond this machine, and has no API keys",
        f"set {key}.api_keys_env: VAR or {key}.api_keys_file: PATH (keys never in the YAML), "
        f"or {key}.allow_unauthenticated: true to serve it open on purpose",
    )]


class ServingArgs(_Strict):
    """The ``args:`` of one Serve application: one model, or several behind one endpoint."""

    models: list[DeploymentSpec] = Field(min_length=1)
    ingress_replicas: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)
    retry_attempts: int = Field(default=2, ge=0, description="Retries of a request that no replica could start.")
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    data_path: Literal["ingress", "direct"] = Field(
        default="ingress",
        description="ingress: proxy -> FleetIngress -> replica (retries, 503 while no replica runs, several "
                    "models); direct: the replica serves HTTP itself behind Ray Serve's HAProxy "
                    "(cluster/serving/direct.py), one model, plain-vLLM throughput.")

    @model_validator(mode="after")
    def _direct_is_one_model(self) -> ServingArgs:
        if self.data_path == "direct" and len(self.models) > 1:
            raise ValueError("data_path: direct serves one model per application (the replica is the HTTP "
                             "endpoint); put each model in an application of its own, or use data_path: ingress")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> ServingArgs:
        seen: set[str] = set()
        for spec in self.models:
            if spec.served_name in seen:
                raise ValueError(f"two models are served as {spec.served_name!r}; give each a distinct model.served_name")
            seen.add(spec.served_name)
        return self


_SERVING_KEYS = {"ingress_replicas", "request_timeout_s", "retry_attempts", "endpoint", "data_path"}


def load_serving_args(
    args: dict[str, Any], source: str | Path | None = None, key_prefix: str = "args.", in_cluster: bool = False
) -> ServingArgs:
    """Validate a Serve application's ``args`` into :class:`ServingArgs`.

    A single-model ``args`` (the common case) is the spec itself; ``models:``
    holds several. Every problem is reported with its file and dotted key.
    ``in_cluster``: the args are being built inside the Ray cluster (see
    :func:`expand_env`), where ``${VAR:-default}`` may not fall back.
    """
    if not isinstance(args, dict):
        raise ConfigError(source, key_prefix.rstrip("."), "must be a mapping", "write the deployment spec under args:")
    try:
        args = expand_env(args, defaults_allowed=not in_cluster)
    except UnresolvedReference as exc:
        if in_cluster:
            raise ConfigError(
                source, key_prefix.rstrip("."),
                f"${{{exc.name}}} is not set in the Ray cluster's environment. Serve builds a config file's apps "
                "inside the cluster, so a variable set in the shell that ran `serve run`/`serve deploy` never "
                "reaches it" + (" and the file's default would be used silently" if exc.has_default else ""),
                "serve the file with `fleetserve serve FILE` (it resolves ${...} and --set in your shell), "
                f"or write the value into the file, or set env.{exc.name} in the hostfile and re-run `fleetserve up`",
            ) from None
        raise ConfigError(
            source, key_prefix.rstrip("."), f"environment variable {exc.name} is not set",
            f"export {exc.name}=... or give a default: ${{{exc.name}:-value}}",
        ) from None
    if "models" in args:
        data = dict(args)
    else:
        data = {k: v for k, v in args.items() if k in _SERVING_KEYS}
        data["models"] = [{k: v for k, v in args.items() if k not in _SERVING_KEYS}]
        key_prefix_models = key_prefix
    try:
        serving = ServingArgs.model_validate(data)
    except ValidationError as exc:
        errs = pydantic_errors(source, exc, prefix=key_prefix, fixes=_FIXES)
        if "models" not in args:
            # Errors for a single-model args point at args.<key>, not args.models.0.<key>.
            for e in errs.errors:
                if e.location and e.location.startswith(f"{key_prefix}models.0."):
                    e.location = key_prefix_models + e.location[len(f"{key_prefix}models.0."):]
            errs = ConfigErrors(errs.errors)
        raise errs from None
    problems = []
    for i, spec in enumerate(serving.models):
        prefix = key_prefix if "models" not in args else f"{key_prefix}models.{i}."
        problems += _check_accelerator(spec, source, prefix)
    if problems:
        raise ConfigErrors(problems)
    return serving


_FIXES = {
    "models.0.model": "set model: /path/to/model (or model: {source: ..., served_name: ...})",
}


def _check_accelerator(spec: DeploymentSpec, source: Any, prefix: str) -> list[ConfigError]:
    out = []
    if spec.accelerator == "CPU" and spec.flaggems.enabled and not spec.flaggems.fallback_to_stock:
        out.append(ConfigError(
            source, f"{prefix}flaggems.enabled",
            "FlagGems kernels are Triton GPU kernels and cannot run on accelerator: CPU",
            "set flaggems.enabled: false, or accelerator: GPU",
        ))
    return out


def check_world_size(
    spec: DeploymentSpec, gpus_per_node: list[int], source: Any, prefix: str, where: str
) -> list[ConfigError]:
    """TP must fit in one node; TP x PP must fit in the nodes (one PP stage per node at most)."""
    if spec.accelerator != "GPU" or not gpus_per_node:
        return []
    largest = max(gpus_per_node)
    tp, pp = spec.tensor_parallel_size, spec.pipeline_parallel_size
    if tp > largest:
        return [ConfigError(
            source, f"{prefix}tensor_parallel_size",
            f"tensor_parallel_size={tp} is larger than any host's GPUs (largest: {largest} in {where}); "
            "tensor parallelism stays inside one host",
            f"use tensor_parallel_size <= {largest} and raise pipeline_parallel_size to span hosts",
        )]
    stages_fit = sum(n // tp for n in gpus_per_node)
    if pp > stages_fit:
        return [ConfigError(
            source, f"{prefix}pipeline_parallel_size",
            f"TP x PP = {tp} x {pp} needs {pp} hosts with {tp} free GPUs each; {where} has room for {stages_fit} such stages",
            "lower pipeline_parallel_size or add hosts",
        )]
    return []
