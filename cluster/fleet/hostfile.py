"""Hostfiles and the cluster config: which hosts, how to reach them, how to run Ray there.

Format (a superset of FlagScale's ``HOST slots=N type=T`` lines, which load unchanged;
docs/cluster.md says what else of FlagScale's files is accepted and what is not)::

    # comments and blank lines are ignored
    10.0.0.1 slots=8 type=H100 head        # ``head`` marks the Ray head (default: first host)
    10.0.0.2 slots=8 type=H100 user=ubuntu port=2222
    gpu-node-3 slots=8 ip=10.0.0.3         # ``ip=``: the address Ray uses, when HOST is a name

    [cluster]                              # optional: cluster-wide settings, ``key = value``
    ssh.user = root
    ssh.key = ~/.ssh/id_ed25519
    docker.image = registry/flagrelease:tag
    env.NCCL_DEBUG = INFO
    ray.version = 2.58.0

The same settings may instead live in a YAML file (``*.yaml``/``*.yml``) whose
``hosts:`` key holds the hostfile lines (or ``hostfile:`` a path to one).

Why a hand-written line parser: FlagScale's format is whitespace-separated
``key=value`` tokens, which neither YAML nor INI parses; every token is still
validated by pydantic (:class:`Host`, :class:`ClusterSettings`), and every
problem becomes a :class:`~cluster.errors.ConfigError` naming file, line and fix.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.errors import ConfigError, ConfigErrors, pydantic_errors

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTAINER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgtBKMGT]?$")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,7}")  # ASCII digits only: str.isdigit() also takes '²', '８', '٢'


@dataclass(frozen=True)
class HostKey:
    """One ``key=value`` a host line may carry: the single table parsing, messages and docs derive from."""

    field: str  # the :class:`Host` field it sets
    kind: Literal["number", "text", "flag"]
    meaning: str
    example: str


#: Every key of a host line. ``HOST`` itself (the first token, ``[user@]address``) is not a key.
HOST_KEYS: dict[str, HostKey] = {
    "slots": HostKey("slots", "number", "the number of GPUs on the host (Ray --num-gpus), 1-1024; required", "8"),
    "type": HostKey("gpu_type", "text", "the GPU model, e.g. H100 (FlagScale's type=); letters, digits, '-', '_', '.'",
                    "H100"),
    "user": HostKey("user", "text", "the SSH login on this host (default: ssh.user; or write user@HOST)", "ubuntu"),
    "port": HostKey("port", "number", "the SSH port of this host, 1-65535 (default: ssh.port)", "2222"),
    "ip": HostKey("ip", "text", "the IP address Ray and NCCL use (default: HOST)", "192.168.10.1"),
    "cpus": HostKey("cpus", "number", "the logical CPUs Ray offers there, >= 1 (default: ray.num_cpus)", "64"),
    "head": HostKey("head", "flag", "marks the Ray head (default: the first host); head=true/false also works",
                    "head"),
}
_FIELD_KEYS = {spec.field: key for key, spec in HOST_KEYS.items()}
_HOST_FIX = "start the line with a hostname or IP address (letters, digits, '-', '_', '.'), e.g. 10.0.0.1 or gpu-node-1"


def _key_fix(key: str) -> str:
    spec = HOST_KEYS[key]
    example = spec.example if spec.kind == "flag" else f"{key}={spec.example}"
    return f"set {key}= to {spec.meaning}, e.g. {example}"


def hostfile_keys_markdown() -> str:
    """The host-line key table of docs/cluster.md (a test keeps the two equal)."""
    rows = ["| key | meaning | example |", "|---|---|---|"]
    for key, spec in HOST_KEYS.items():
        example = spec.example if spec.kind == "flag" else f"{key}={spec.example}"
        rows.append(f"| `{key}` | {spec.meaning} | `{example}` |")
    return "\n".join(rows) + "\n"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_address(value: str) -> str:
    """A hostname or an IP address (v4 or v6), nothing else (no spaces, no ``user@``)."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value) or value.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is not a hostname or an IP address")
    return value


class Host(_Strict):
    """One line of the hostfile."""

    address: str = Field(description="Hostname or IP address used for SSH.")
    slots: int = Field(ge=1, le=1024, description=HOST_KEYS["slots"].meaning)
    gpu_type: str | None = Field(default=None, description=HOST_KEYS["type"].meaning)
    user: str | None = Field(default=None, description=HOST_KEYS["user"].meaning)
    port: int | None = Field(default=None, ge=1, le=65535, description=HOST_KEYS["port"].meaning)
    ip: str | None = Field(default=None, description=HOST_KEYS["ip"].meaning)
    cpus: int | None = Field(default=None, ge=1, le=100000, description=HOST_KEYS["cpus"].meaning)
    head: bool = Field(default=False, description=HOST_KEYS["head"].meaning)
    line: int = Field(default=0, description="Line in the hostfile (for messages).")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)  # ValueError names the bad value
        return value

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", value):
            raise ValueError(f"GPU type {value!r} may hold only letters, digits, '-', '_', '.'")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]*$", value):
            raise ValueError(f"user {value!r} is not a valid login name")
        return value

    @property
    def name(self) -> str:
        return self.address

    @property
    def ray_ip(self) -> str:
        return self.ip or self.address


class SSHSettings(_Strict):
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    key: str | None = Field(default=None, description="Private key file; default: ssh-agent, then ~/.ssh/id_*.")
    known_hosts: str = Field(default="~/.ssh/known_hosts", description="Host keys are checked against this file.")
    connect_timeout: float = Field(default=10.0, gt=0, le=600)
    use_agent: bool = True


class DockerSettings(_Strict):
    """Docker mode (the FlagRelease images): Ray runs inside one named container per host."""

    image: str = Field(min_length=1)
    name: str = Field(default="fleetserve-ray", description="Container name on every host.")
    shm_size: str = Field(default="32g", description="docker --shm-size (the seeds use 32G-512g).")
    gpus: str | None = Field(default="all", description="docker --gpus; null on hosts without the NVIDIA runtime.")
    privileged: bool = False
    volumes: list[str] = Field(default_factory=list, description="docker -v entries, e.g. /nfs:/nfs.")
    run_args: list[str] = Field(default_factory=list, description="Extra docker run arguments.")
    python: str = Field(default="python3", description="Python inside the image.")
    ray: str = Field(default="ray", description="ray CLI inside the image.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CONTAINER_NAME.match(value):
            raise ValueError(f"container name {value!r} may hold only letters, digits, '_', '.', '-'")
        return value

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, value: str) -> str:
        if not _SIZE.match(value):
            raise ValueError(f"shm_size {value!r} is not a size like 32g or 512m")
        return value


class RaySettings(_Strict):
    version: str | None = Field(default=None, description="Required Ray version on every host (default: the head's).")
    python: str = Field(default="python3", description="Python on the hosts that has ray/vllm/torch.")
    ray: str = Field(default="ray", description="The ray CLI on the hosts.")
    port: int = Field(default=6379, ge=1, le=65535, description="GCS port on the head.")
    dashboard_port: int = Field(default=8265, ge=1, le=65535)
    dashboard: bool = True
    client_server_port: int = Field(default=10001, ge=1, le=65535)
    node_manager_port: int = Field(default=0, ge=0, le=65535, description="0: Ray picks a free port.")
    object_manager_port: int = Field(default=0, ge=0, le=65535, description="0: Ray picks a free port.")
    num_cpus: int | None = Field(default=None, ge=1, description="Logical CPUs per node (default: Ray detects).")
    object_store_memory: int | None = Field(default=None, ge=78643200, description="Bytes (Ray's minimum is 75 MiB).")
    temp_dir: str = Field(default="/tmp/ray", description="Ray's --temp-dir on each host.")
    min_shm_bytes: int = Field(default=1 << 30, ge=0, description="Preflight: /dev/shm must be at least this big.")
    join_timeout: float = Field(default=120.0, gt=0, description="Seconds to wait for every node to join.")
    start_retries: int = Field(default=1, ge=0, le=5, description="Retries of a ray start that timed out registering.")
    auth: Literal["token", "disabled"] = Field(
        default="token", description="Ray token authentication on every node; 'disabled' only for clusters that "
        "cannot use it (anyone who reaches the head can then run code on it).")
    dashboard_host: str | None = Field(
        default=None, description="Address the dashboard binds (default: the head's cluster address; "
        "0.0.0.0 only on purpose).")
    secrets_dir: str = Field(
        default="~/.fleetserve", description="Directory on each host for the cluster's Ray token and node "
        "environment (mode 0700, files 0600).")
    command_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a short remote command (probe, stop, query) may take.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> RaySettings:
        ports = [self.port, self.dashboard_port, self.client_server_port]
        if len(set(ports)) != len(ports):
            raise ValueError("ray.port, ray.dashboard_port and ray.client_server_port must differ")
        return self


class ClusterSettings(_Strict):
    """Cluster-wide settings (the ``[cluster]`` section or the YAML file)."""

    name: str = "fleetserve"
    ssh: SSHSettings = Field(default_factory=SSHSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    docker: DockerSettings | None = None
    env: dict[str, str] = Field(default_factory=dict, description="Environment for Ray on every host.")

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str) or not _ENV_NAME.match(k)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not an environment variable name")
            typed = [k for k, v in value.items() if v is not None and not isinstance(v, str)]
            if typed:
                raise ValueError(f"env.{typed[0]} is a {type(value[typed[0]]).__name__}, not a string")
            return {k: ("" if v is None else v) for k, v in value.items()}
        return value


class ClusterConfig(_Strict):
    """A parsed hostfile plus its cluster settings."""

    source: str
    hosts: tuple[Host, ...] = Field(min_length=1)
    settings: ClusterSettings = Field(default_factory=ClusterSettings)

    @property
    def head(self) -> Host:
        return next((h for h in self.hosts if h.head), self.hosts[0])

    @property
    def workers(self) -> list[Host]:
        head = self.head
        return [h for h in self.hosts if h is not head]

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.hosts)

    def ssh_user(self, host: Host) -> str:
        return host.user or self.settings.ssh.user

    def ssh_port(self, host: Host) -> int:
        return host.port or self.settings.ssh.port

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if name in (h.address, h.ip):
                return h
        raise ConfigError(self.source, None, f"no host {name!r} in the hostfile",
                          f"use one of: {', '.join(h.address for h in self.hosts)}")


# --------------------------------------------------------------------------- parsing


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class _TextScalarLoader(yaml.SafeLoader):
    """YAML with no implicit typing but null: ``yes``, ``010``, ``1:30``, ``0x1F``, ``3.0`` stay the text written.

    YAML 1.1 turns those into True, 8, 90, 31, 3.0 (a ``ray.version`` of 2.10
    would become 2.1); pydantic converts the text to each setting's declared
    type instead, so ``ray.port = 6380`` still is a number and ``env.A = yes``
    the string 'yes'.
    """


_TextScalarLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_TextScalarLoader)  # noqa: S506 - a SafeLoader subclass


def _char_problem(text: str) -> str | None:
    """Name the first character no host line may hold (they are ASCII), e.g. a BOM or a fullwidth digit."""
    for char in text:
        if not char.isascii() or (not char.isprintable() and char not in " \t"):
            name = "a byte-order mark (BOM)" if char == "\ufeff" else unicodedata.name(char, "a control character")
            return f"holds {char!r} (U+{ord(char):04X}, {name}); host lines are plain ASCII"
    return None


def _parse_host_line(text: str, lineno: int, source: str, errors: list[ConfigError]) -> Host | None:
    """One host line; appends its problems to ``errors`` (all of them, so one run shows every fix)."""
    where, count = f"line {lineno}", len(errors)
    bad_char = _char_problem(text)
    if bad_char:
        errors.append(ConfigError(source, where, bad_char, "retype the line in plain ASCII (or delete the character)"))
        return None
    tokens = text.split()
    address, rest = tokens[0], tokens[1:]
    fields: dict[str, Any] = {"address": address, "line": lineno}
    if "=" in address:
        errors.append(ConfigError(source, where, f"line starts with {address!r}, not a host",
                                  "start the line with the host name or IP, e.g. '10.0.0.1 slots=8'"))
        return None
    if "@" in address:
        user, _, address = address.rpartition("@")
        fields.update(address=address, user=user)
    for token in rest:
        key, eq, value = token.partition("=")
        key = key.lower()
        spec = HOST_KEYS.get(key)
        if spec is None:
            known = ", ".join(HOST_KEYS)
            fix = (f"remove it: fleetserve has no per-host GPU list (slots= is the GPU count; Ray hands out GPUs); "
                   f"known keys: {known}" if key == "gpus" else f"{_suggest(key, HOST_KEYS)}known keys: {known}")
            errors.append(ConfigError(source, where, f"unknown key {key!r}" if eq else f"{token!r} is not key=value",
                                      fix))
            continue
        if spec.field in fields and spec.field != "address":
            errors.append(ConfigError(source, where, f"{key!r} given twice", "keep one"))
            continue
        if spec.kind == "flag":
            if eq and value.lower() not in ("true", "false"):
                errors.append(ConfigError(source, where, f"{key}={value!r} is not true or false", _key_fix(key)))
                continue
            fields[spec.field] = not eq or value.lower() == "true"
            continue
        if not eq or not value:
            errors.append(ConfigError(source, where, f"{token!r} has no value", _key_fix(key)))
            continue
        if spec.kind == "number":
            if not _WHOLE_NUMBER.fullmatch(value):
                errors.append(ConfigError(source, where, f"{key}={value!r} is not a whole number", _key_fix(key)))
                continue
            fields[spec.field] = int(value)
            continue
        fields[spec.field] = value
    if "slots" not in fields:
        if len(errors) == count:  # one complaint per line is enough
            errors.append(ConfigError(source, where, f"host {address!r} has no slots=",
                                      "add slots=N with the number of GPUs on that host, e.g. 'slots=8'"))
        return None
    try:
        return Host(**fields)
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "address"
            key = _FIELD_KEYS.get(field, "host")
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            errors.append(ConfigError(source, where, f"{key}: {msg}", _key_fix(key) if key in HOST_KEYS else _HOST_FIX))
        return None


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{part!r} is a value, not a section")
        node = child
    if parts[-1] in node:
        raise ValueError(f"{dotted!r} given twice")
    node[parts[-1]] = value


def _section_value(key: str, raw: str) -> Any:
    """A ``[cluster]`` value: the text written (pydantic types it), a quoted string, a flow list/map, or null.

    ``env.*`` values are always the text written (quotes removed), so ``env.A = null`` is 'null'.
    """
    raw = raw.strip()
    if not raw:
        return "" if key.startswith("env.") else None
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError:
        return raw
    if key.startswith("env."):
        return value if isinstance(value, str) and raw[:1] in "'\"" else raw
    return value


def _strip_comment(line: str, anywhere: bool) -> str:
    # On host lines '#' starts a comment anywhere (FlagScale's 'slots=8#comment'); in [cluster]
    # only at the start or after whitespace, since values such as URLs may hold '#'.
    m = re.search(r"#" if anywhere else r"(^|\s)#", line)
    return (line[: m.start()] if m else line).strip()


def _duplicates(hosts: list[Host], default_port: int, source: str) -> list[ConfigError]:
    """The same SSH endpoint (address, port) twice, or two hosts giving Ray the same address."""
    errors = []
    endpoints: dict[tuple[str, int], Host] = {}
    ray_ips: dict[str, Host] = {}
    for h in hosts:
        endpoint = (_canonical(h.address), h.port or default_port)
        if endpoint in endpoints:
            first = endpoints[endpoint]
            errors.append(ConfigError(source, f"line {h.line}", f"host {h.address!r} (SSH port {endpoint[1]}) is "
                                      f"listed twice (first on line {first.line})", "list each host once"))
            continue
        endpoints[endpoint] = h
        ray_ip = _canonical(h.ray_ip)
        if ray_ip in ray_ips:
            first = ray_ips[ray_ip]
            errors.append(ConfigError(source, f"line {h.line}", f"Ray address {h.ray_ip!r} is used twice (first "
                                      f"on line {first.line}): one host would carry two Ray nodes",
                                      "give each host its own ip= (the address Ray and NCCL use)"))
            continue
        ray_ips[ray_ip] = h
    return errors


def _canonical(address: str) -> str:
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address.lower().rstrip(".")


def parse_hostfile_text(text: str, source: str = "<hostfile>", base: dict[str, Any] | None = None,
                        key_lines: dict[str, int] | None = None, line_offset: int = 0) -> ClusterConfig:
    """Parse hostfile text (host lines, optional ``[cluster]`` section); all errors at once.

    Lines are split on '\\n' only (as editors count them); one pass, so time is linear in the text.
    A UTF-8 byte-order mark at the very start is skipped (editors on Windows write one).
    """
    errors: list[ConfigError] = []
    hosts: list[Host] = []
    settings: dict[str, Any] = dict(base or {})
    key_lines = dict(key_lines or {})
    section = "hosts"
    for index, raw_line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        lineno = index + line_offset
        where = f"line {lineno}"
        line = _strip_comment(raw_line, anywhere=section != "cluster")
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip().lower()
            if name not in ("cluster", "hosts"):
                errors.append(ConfigError(source, where, f"unknown section [{name}]",
                                          f"{_suggest(name, ['cluster', 'hosts'])}use [cluster] or [hosts]"))
                section = "skip"
            else:
                section = name
            continue
        if section == "skip":
            continue
        if section == "cluster":
            key, eq, value = line.partition("=")
            key = key.strip()
            if not eq or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
                errors.append(ConfigError(source, where, f"{line!r} is not 'key = value'",
                                          "write settings as e.g. 'ssh.user = root' or 'docker.image = IMAGE'"))
                continue
            try:
                _set_dotted(settings, key, _section_value(key, value))
                key_lines[key] = lineno
            except ValueError as exc:
                errors.append(ConfigError(source, where, str(exc), "set each key once"))
            continue
        host = _parse_host_line(line, lineno, source, errors)
        if host is not None:
            hosts.append(host)

    heads = [h for h in hosts if h.head]
    if len(heads) > 1:
        errors.append(ConfigError(source, f"line {heads[1].line}", "more than one host is marked head "
                                  f"(lines {', '.join(str(h.line) for h in heads)})", "mark exactly one host 'head'"))
    if not hosts and not errors:
        errors.append(ConfigError(source, None, "no hosts listed",
                                  "add one line per host: 'HOST slots=N [type=GPU_TYPE]', e.g. '10.0.0.1 slots=8'"))

    parsed_settings: ClusterSettings | None = None
    try:
        parsed_settings = ClusterSettings(**settings)
    except ValidationError as exc:
        for err in pydantic_errors(source, exc, fixes=_SETTING_FIXES).errors:
            dotted = err.location or ""
            line = _line_for(dotted, key_lines)
            errors.append(ConfigError(source, f"line {line}: {dotted}" if line else dotted or None,
                                      err.problem, err.fix or _setting_fix(dotted)))
    except TypeError as exc:  # settings not a mapping (YAML gave a scalar)
        errors.append(ConfigError(source, None, f"cluster settings are not a mapping: {exc}",
                                  "write settings as key: value pairs"))
    default_port = parsed_settings.ssh.port if parsed_settings else SSHSettings.model_fields["port"].default
    errors += _duplicates(hosts, default_port, source)
    if errors:
        raise ConfigErrors(errors)
    assert parsed_settings is not None
    return ClusterConfig(source=source, hosts=tuple(hosts), settings=parsed_settings)


_SETTING_FIXES = {
    "docker.image": "set docker.image to the image to run, e.g. docker.image = registry/flagrelease:tag",
    "ssh.port": "ssh.port is the default SSH port (1-65535)",
    "ray.port": "ray.port is the head's GCS port (1-65535), default 6379",
}


def _setting_fix(dotted: str) -> str:
    """A fix for a bad setting: its description and type, from the pydantic model."""
    model: Any = ClusterSettings
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            break
        info = fields[part]
        if i == len(parts) - 1 or not hasattr(info.annotation, "model_fields"):
            ann = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            if hasattr(info.annotation, "model_fields") or ann.endswith("Settings") or "Settings" in ann:
                return f"{dotted} is a section: set its keys, e.g. '{dotted}.<key> = value' (see docs/cluster.md)"
            desc = f" ({info.description})" if info.description else ""
            quote = f"; quote it if it looks like a number, e.g. {dotted} = \"2.10\"" if "str" in ann else ""
            return f"set {dotted} to a {ann} value{desc}{quote}"
        model = info.annotation
    return "check the key and its value against docs/cluster.md"


def _line_for(dotted: str, key_lines: dict[str, int]) -> int | None:
    """The line that set ``dotted``: the key itself, else its nearest parent, else its first child."""
    if dotted in key_lines:
        return key_lines[dotted]
    children = [line for key, line in key_lines.items() if key.startswith(dotted + ".")]
    if children:
        return min(children)
    if "." in dotted:  # a missing key: point at its section
        return _line_for(dotted.rsplit(".", 1)[0], key_lines)
    return None


def _yaml_key_lines(text: str) -> dict[str, int]:
    """1-based line of every (nested) mapping key in a YAML document, as dotted paths."""
    out: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    path = f"{prefix}{k.value}"
                    out[path] = k.start_mark.line + 1
                    walk(v, path + ".")

    walk(root, "")
    return out


def parse_yaml_config(text: str, source: str, base_dir: Path) -> ClusterConfig:
    """A YAML cluster file: settings plus ``hosts:`` (lines) or ``hostfile:`` (a path)."""
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise ConfigError(source, where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                          "fix the YAML syntax (indentation, ':' after keys)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, None, "the cluster file must be a mapping",
                          "write it as 'hosts:' plus optional 'ssh:', 'ray:', 'docker:', 'env:' keys")
    key_lines = _yaml_key_lines(text)
    data = dict(data)
    hosts = data.pop("hosts", None)
    hostfile = data.pop("hostfile", None)
    if (hosts is None) == (hostfile is None):
        raise ConfigError(source, None, "give exactly one of 'hosts:' (hostfile lines) or 'hostfile:' (a path)",
                          "add e.g. 'hosts: [\"10.0.0.1 slots=8\", \"10.0.0.2 slots=8\"]'")
    if hostfile is not None:
        if not isinstance(hostfile, str) or not hostfile:
            raise ConfigError(source, f"line {key_lines.get('hostfile')}: hostfile", "hostfile must be a path",
                              "set hostfile: to the path of a FlagScale hostfile")
        path = (base_dir / Path(hostfile).expanduser()).resolve()
        try:
            host_text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, f"line {key_lines.get('hostfile')}: hostfile",
                              f"cannot read hostfile {path}: {exc}", "point hostfile: at an existing file") from None
        return parse_hostfile_text(host_text, str(path), base=data, key_lines=key_lines)
    if isinstance(hosts, str):
        host_text, offset = hosts, key_lines.get("hosts", 0)
    elif isinstance(hosts, list) and all(isinstance(h, str) for h in hosts):
        host_text, offset = "\n".join(hosts), key_lines.get("hosts", 0)
    else:
        raise ConfigError(source, f"line {key_lines.get('hosts')}: hosts", "hosts must be a list of hostfile lines",
                          "write each host as a string, e.g. - \"10.0.0.1 slots=8 type=H100\"")
    return parse_hostfile_text(host_text, source, base=data, key_lines=key_lines, line_offset=offset)


def load_hostfile(path: str | Path) -> ClusterConfig:
    """Load a hostfile (FlagScale format + ``[cluster]`` section) or a YAML cluster file."""
    path = Path(path).expanduser()
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read the hostfile: {exc.strerror or exc}",
                          "pass the path of an existing hostfile") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(source, f"line {line}", "not UTF-8 text", "save the hostfile as plain UTF-8 text") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigError(source, f"line {line}", "contains a NUL byte", "save the hostfile as plain text")
    if path.suffix.lower() in (".yaml", ".yml"):
        return parse_yaml_config(text.removeprefix("\ufeff"), source, path.parent)
    return parse_hostfile_text(text, source)


def render_hostfile(config: ClusterConfig) -> str:
    """Host lines in the canonical format (used to write example/test hostfiles)."""
    lines = []
    for h in config.hosts:
        parts = [h.address, f"slots={h.slots}"]
        for key, value in (("type", h.gpu_type), ("user", h.user), ("port", h.port), ("ip", h.ip),
                           ("cpus", h.cpus)):
            if value is not None:
                parts.append(f"{key}={value}")
        if h.head:
            parts.append("head")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"

