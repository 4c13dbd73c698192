"""Endpoint hardening without a cluster: spec checks, key loading, address policy, header pixel check."""

from __future__ import annotations

import ipaddress
import os

import pytest

from cluster.errors import ConfigError
from cluster.serving.auth import key_matches, load_key_digests
from cluster.serving.limits import RequestRejected
from cluster.serving.media import address_allowed, check_image_bytes, domain_allowed
from cluster.serving.spec import EndpointSpec, check_endpoint_exposure, load_serving_args

from test_endpoint_security import huge_png_header, png_bytes


def test_open_endpoint_beyond_loopback_is_refused_unless_on_purpose(tmp_path):
    def serving(endpoint: dict, data_path: str = "ingress"):
        return load_serving_args({"model": str(tmp_path), "endpoint": endpoint, "data_path": data_path}, source="t")

    open_ = serving({})
    assert check_endpoint_exposure(open_, "127.0.0.1", "f", "args.endpoint", "h") == []
    assert check_endpoint_exposure(open_, "::1", "f", "args.endpoint", "h") == []
    [err] = check_endpoint_exposure(open_, "0.0.0.0", "f.yaml", "args.endpoint", "http_options.host")
    assert "no API keys" in err.problem and "allow_unauthenticated" in err.fix
    assert check_endpoint_exposure(serving({"allow_unauthenticated": True}), "0.0.0.0", "f", "k", "h") == []
    assert check_endpoint_exposure(serving({"api_keys_env": "K"}), "10.0.0.5", "f", "k", "h") == []
    # The direct path's replicas listen on every interface even when Serve's proxy is on loopback.
    [err] = check_endpoint_exposure(serving({}, "direct"), "127.0.0.1", "f.yaml", "args.endpoint", "http_options.host")
    assert "every interface" in err.problem
    assert check_endpoint_exposure(serving({"api_keys_env": "K"}, "direct"), "127.0.0.1", "f", "k", "h") == []


def test_api_keys_env_must_be_a_name_not_a_key(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_serving_args({"model": str(tmp_path), "endpoint": {"api_keys_env": "sk-live-abc"}}, source="t.yaml")
    assert "NAME of an environment variable" in str(exc.value) and "args.endpoint.api_keys_env" in str(exc.value)


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FS_KEYS", "alpha, beta")
    keyfile = tmp_path / "keys"
    keyfile.write_text("# ops\ngamma\n")
    os.chmod(keyfile, 0o600)
    digests = load_key_digests(EndpointSpec(api_keys_env="FS_KEYS", api_keys_file=str(keyfile)))
    assert len(digests) == 3
    assert all(key_matches(k, digests) for k in ("alpha", "beta", "gamma"))
    assert not key_matches("alph", digests) and not key_matches("", digests)
    os.chmod(keyfile, 0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        load_key_digests(EndpointSpec(api_keys_file=str(keyfile)))
    monkeypatch.delenv("FS_KEYS")
    with pytest.raises(ConfigError) as exc:
        load_key_digests(EndpointSpec(api_keys_env="FS_KEYS"))
    assert "FS_KEYS" in str(exc.value)


@pytest.mark.parametrize("addr,allowed", [
    ("8.8.8.8", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("172.16.0.1", False),
    ("169.254.169.254", False), ("fd00:ec2::254", False), ("100.64.0.1", False), ("224.0.0.1", False),
    ("0.0.0.0", False), ("240.0.0.1", False), ("::ffff:127.0.0.1", False), ("2002:7f00:1::", False),
    ("64:ff9b::7f00:1", False),
])
def test_address_policy(addr, allowed):
    assert address_allowed(ipaddress.ip_address(addr), []) is allowed


def test_allowed_networks_never_open_metadata():
    nets = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("169.254.0.0/16")]
    assert address_allowed(ipaddress.ip_address("127.0.0.2"), nets)
    assert not address_allowed(ipaddress.ip_address("169.254.169.254"), nets)


def test_domain_allowlist():
    assert domain_allowed("anything.example", [])
    assert domain_allowed("img.example.com", ["*.example.com"])
    assert domain_allowed("example.com", ["example.com"])
    assert not domain_allowed("example.com.evil.net", ["example.com", "*.example.com"])


def test_pixel_limit_reads_the_header_only():
    with pytest.raises(RequestRejected, match="12000 x 12000"):
        check_image_bytes(huge_png_header(), 0, 40_000_000)
    assert check_image_bytes(png_bytes(), 0, 40_000_000) == "image/png"


def test_a_request_without_max_tokens_gets_the_cap():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    from cluster.serving.limits import apply_limits
    from cluster.serving.spec import RequestLimits

    capped, open_ended = RequestLimits(max_tokens=64), RequestLimits()
    messages = [{"role": "user", "content": "hi"}]
    chat = ChatCompletionRequest(model="m", messages=messages)
    apply_limits(chat, capped, chat=True)
    assert chat.max_tokens == 64
    named = ChatCompletionRequest(model="m", messages=messages, max_completion_tokens=5)
    apply_limits(named, capped, chat=True)
    assert named.max_tokens is None and named.max_completion_tokens == 5
    # Completions have a library default (16): kept under a larger cap, lowered to a smaller one.
    default = CompletionRequest(model="m", prompt="x").max_tokens
    completion = CompletionRequest(model="m", prompt="x")
    apply_limits(completion, capped, chat=False)
    assert completion.max_tokens == min(64, default)
    tight = CompletionRequest(model="m", prompt="x")
    apply_limits(tight, RequestLimits(max_tokens=2), chat=False)
    assert tight.max_tokens == 2
    uncapped = ChatCompletionRequest(model="m", messages=messages)
    apply_limits(uncapped, open_ended, chat=True)
    assert uncapped.max_tokens is None


def test_malformed_fields_are_validation_errors_not_crashes():
    """vLLM's validators call ``.get`` on what should be a dict: the routes' models make that a 4xx."""
    from pydantic import ValidationError

    from cluster.serving.limits import ChatRequest, CompletionsRequest

    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ValidationError, match="malformed"):
        ChatRequest.model_validate({"model": "m", "messages": messages, "structured_outputs": True})
    with pytest.raises(ValidationError):
        CompletionsRequest.model_validate({"model": "m", "prompt": "x", "structured_outputs": True})
    ok = ChatRequest.model_validate({"model": "m", "messages": messages, "max_tokens": 3})
    assert ok.max_tokens == 3 and isinstance(ok, ChatRequest)


def test_a_replica_ends_itself_when_a_host_of_its_workers_is_lost(monkeypatch):
    """vLLM does not notice a lost PP stage; the replica's watch turns it into a replica failure."""
    import asyncio

    import ray

    from cluster.serving import engine

    monkeypatch.setattr(engine, "_other_worker_nodes", lambda: {"node-b"})
    monkeypatch.setattr(engine, "WORKER_NODES_PERIOD_S", 0)
    tables = iter([[{"NodeID": "node-a", "Alive": True}, {"NodeID": "node-b", "Alive": True}],
                   [{"NodeID": "node-a", "Alive": True}, {"NodeID": "node-b", "Alive": False}]])
    monkeypatch.setattr(ray, "nodes", lambda: next(tables))

    class Exited(Exception):
        pass

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(engine.os, "_exit", exit_)
    server = engine.FleetLLMServer.__new__(engine.FleetLLMServer)
    with pytest.raises(Exited):
        asyncio.run(server._watch_worker_nodes())
    # No worker on another node (or no placement group): nothing to watch.
    monkeypatch.setattr(engine, "_other_worker_nodes", set)
    asyncio.run(server._watch_worker_nodes())
