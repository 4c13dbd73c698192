"""A 2-layer random-weight Qwen2 text model made locally (no download), and an app runner.

The scale-out, metrics and fault tests need *a* vLLM model that starts fast on
a CPU; they do not exercise the vision path (tests/test_serving.py does, with
the tiny Qwen2.5-VL). A WordLevel tokenizer from ``tokenizers`` keeps the
directory self-contained. Head dim 64: vLLM's CPU attention refuses 16.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MODEL_CACHE = Path(os.environ.get("FLEETSERVE_TEST_MODELS", Path.home() / ".cache/fleetserve/test-models"))
# The environment of every test engine: 1 GiB of KV cache (several engines share
# this machine) and no torch.compile -- vLLM's CPU sampler compiles one function
# at first use even with enforce_eager, 13 s of each engine start (see tiny.yaml).
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] if m['content'] is string else '' }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a of and to in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part"
).split()


def make_tiny_qwen2(out: Path, seed: int = 0) -> Path:
    """Write config.json, tokenizer files and random bf16 safetensors to ``out``."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<unk>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    for w in _WORDS + [f"w{i}" for i in range(400)] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }))
    vocab_size, hidden, layers, inter = 1024, 128, 2, 256
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 3, "hidden_act": "silu",
    }))
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    weights = {"model.embed_tokens.weight": rnd(vocab_size, hidden), "model.norm.weight": ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
            p + "self_attn.q_proj.weight": rnd(128, hidden), p + "self_attn.q_proj.bias": rnd(128),
            p + "self_attn.k_proj.weight": rnd(64, hidden), p + "self_attn.k_proj.bias": rnd(64),
            p + "self_attn.v_proj.weight": rnd(64, hidden), p + "self_attn.v_proj.bias": rnd(64),
            p + "self_attn.o_proj.weight": rnd(hidden, 128),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
        })
    save_file(weights, str(out / "model.safetensors"))
    return out


def tiny_qwen2() -> Path:
    """The tiny text model, made once per machine.

    Made beside its place and renamed into it: the two test streams of
    scripts/test.sh may both find it missing on a fresh machine.
    """
    out = MODEL_CACHE / "tiny-qwen2-text"
    if not (out / "model.safetensors").exists():
        staging = make_tiny_qwen2(out.with_name(f"{out.name}.{os.getpid()}.tmp"))
        try:
            staging.rename(out)
        except OSError:  # a copy is there: the other stream's, or one a crash left half-written
            if not (out / "model.safetensors").exists():
                shutil.rmtree(out, ignore_errors=True)
                staging.rename(out)
            shutil.rmtree(staging, ignore_errors=True)
    return out


def tiny_args(model_dir: Path, served_name: str = "tiny-text", **overrides: Any) -> dict[str, Any]:
    """Serve-app ``args`` for the tiny text model on CPU (deployments/tiny.yaml minus images)."""
    args: dict[str, Any] = {
        "model": {"source": str(model_dir), "served_name": served_name},
        "accelerator": "CPU",
        "cpus_per_worker": 0.5,
        "replica_cpus": 0.5,
        # Eager: skips torch.compile's warm-up, which takes minutes on a shared 2-core machine
        # and is not what the scaling/metrics tests exercise.
        "engine_args": {"max_model_len": 1024, "max_num_seqs": 8, "max_num_batched_tokens": 1024,
                        "dtype": "bfloat16", "enforce_eager": True},
        "runtime_env": {"env_vars": dict(CPU_ENGINE_ENV)},
        "replicas": 1,
    }
    args.update(overrides)
    return args


@contextlib.contextmanager
def local_ray(**init_kwargs):
    """A fresh local Ray instance (8 logical CPUs), shut down on exit.

    A Ray connection left over from an earlier test module (an in-process dry
    run, a failed fixture) is shut down first, so one module's leftovers cannot
    make the next module's ``ray.init`` fail.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", num_cpus=8, logging_level="WARNING", **init_kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
