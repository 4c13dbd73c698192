"""A Ray Serve config file as fleetserve reads it: parsed, resolved where the command runs, validated.

The deployment spec itself (one app's ``args:``) is :mod:`cluster.serving.spec`;
this module is the file around it: reading it safely, resolving ``${VAR}``
and ``--set`` overrides in the user's shell (Serve would build the app inside
the cluster, where that shell's environment is not seen), and validating each
fleetserve application's args with the file and key named in every error.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import ConfigError, ConfigErrors
from cluster.serving.spec import (
    ServingArgs,
    UnresolvedReference,
    check_endpoint_exposure,
    expand_env,
    load_serving_args,
)


def read_serve_file(path: str | Path) -> dict[str, Any]:
    """Parse a Ray Serve config file; every way it can be unreadable is a ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found", "check the path") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the file: {exc.strerror}", "check the path and permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"byte {exc.start}", "not a text file (not UTF-8)",
                          "give a Ray Serve YAML config such as deployments/tiny.yaml") from None
    if "\x00" in text:
        raise ConfigError(path, None, "not a text file (it contains NUL bytes)",
                          "give a Ray Serve YAML config such as deployments/tiny.yaml")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f"line {mark.line + 1}" if mark else None
        raise ConfigError(path, loc, f"not valid YAML: {getattr(exc, 'problem', exc)}", "fix the YAML syntax") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("applications"), list):
        raise ConfigError(path, "applications", "a Serve config needs an `applications:` list",
                          "see deployments/tiny.yaml for the layout")
    return raw


def _fleet_apps(raw: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(index, application)`` of each application built by fleetserve's builder."""
    return [(i, app) for i, app in enumerate(raw["applications"])
            if isinstance(app, dict) and str(app.get("import_path", "")).startswith("cluster.serving")]


def resolve_serve_config(
    raw: dict[str, Any], path: str | Path, overrides: list[str] | None = None, environ: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The config with ``${VAR}`` resolved from ``environ`` (this shell) and ``KEY=VALUE`` overrides applied.

    This is what makes an override typed where the user runs the command reach
    the app: Serve would expand nothing here and build the app inside the
    cluster (see :func:`expand_env`). ``KEY`` is a dotted path in each
    fleetserve application's ``args`` (``tensor_parallel_size=2``,
    ``model.load_format=dummy``, ``models.1.replicas=2``), or ``APP/KEY`` for one
    application; ``VALUE`` is YAML (``null`` removes the key: its default applies).
    """
    out = copy.deepcopy(raw)
    apps = _fleet_apps(out)
    errors = []
    for i, app in apps:
        try:
            app["args"] = expand_env(app.get("args") or {}, environ)
        except UnresolvedReference as exc:
            errors.append(ConfigError(path, f"applications.{i}.args", f"environment variable {exc.name} is not set",
                                      f"export {exc.name}=... or give a default: ${{{exc.name}:-value}}"))
    for item in overrides or []:
        errors += _apply_override(apps, item, path)
    if errors:
        raise ConfigErrors(errors)
    return out


def _apply_override(apps: list[tuple[int, dict[str, Any]]], item: str, path: str | Path) -> list[ConfigError]:
    key, sep, text = item.partition("=")
    app_name, slash, dotted = key.rpartition("/") if "/" in key else ("", "", key)
    if not sep or not dotted.strip():
        return [ConfigError(path, f"--set {item}", "an override must be KEY=VALUE",
                            "e.g. --set tensor_parallel_size=2 --set model.load_format=dummy")]
    targets = [(i, app) for i, app in apps if not slash or app.get("name") == app_name]
    if not targets:
        names = ", ".join(str(app.get("name")) for _, app in apps) or "none"
        return [ConfigError(path, f"--set {item}", f"no fleetserve application named {app_name!r}",
                            f"use one of: {names}")]
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    for i, app in targets:
        node: Any = app.setdefault("args", {})
        parts = dotted.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            nxt = node[int(part)] if isinstance(node, list) and part.isdigit() and int(part) < len(node) else (
                node.setdefault(part, {}) if isinstance(node, dict) else None)
            if isinstance(nxt, str) and depth == 0 and part == "model":
                nxt = node[part] = {"source": nxt}  # `model: /path` shorthand, overriding a sub-key
            if not isinstance(nxt, (dict, list)):
                return [ConfigError(path, f"--set {item}", f"applications.{i}.args.{'.'.join(parts[:depth + 1])} "
                                    "is not a mapping or list", "override the whole key instead")]
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            if not (last.isdigit() and int(last) < len(node)):
                return [ConfigError(path, f"--set {item}", f"{last!r} is not an index of the list", "use 0, 1, ...")]
            node[int(last)] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return []


def load_serve_config(path: str | Path, overrides: list[str] | None = None,
                      environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a Ray Serve config file, resolve it here (:func:`resolve_serve_config`), validate each app's args.

    Returns the resolved YAML tree, with each application's validated
    :class:`ServingArgs` under ``"_fleetserve"`` keyed by application name.
    """
    path = Path(path)
    raw = resolve_serve_config(read_serve_file(path), path, overrides, environ)
    validated: dict[str, ServingArgs] = {}
    errors: list[ConfigError] = []
    fleet = {i for i, _ in _fleet_apps(raw)}
    for i, app in enumerate(raw["applications"]):
        name = app.get("name", f"app{i}") if isinstance(app, dict) else f"app{i}"
        if not isinstance(app, dict) or "import_path" not in app:
            errors.append(ConfigError(path, f"applications.{i}", "each application needs import_path",
                                      "import_path: cluster.serving.app:build_app"))
            continue
        if i not in fleet:
            continue  # not a fleetserve app: Serve validates it itself
        try:
            validated[name] = load_serving_args(app.get("args") or {}, path, key_prefix=f"applications.{i}.args.")
            host = (raw.get("http_options") or {}).get("host")
            errors += check_endpoint_exposure(validated[name], host, path, f"applications.{i}.args.endpoint",
                                              "http_options.host")
        except ConfigErrors as exc:
            errors += exc.errors
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    raw["_fleetserve"] = validated
    return raw
