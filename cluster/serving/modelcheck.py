"""What a model directory's ``config.json`` says about how it can be served.

Checked twice on purpose, by the same code: by ``fleetserve validate`` where it
runs (when the directory is there), and by each replica on its own host before
vLLM spends minutes loading -- the directory may exist only on the GPU hosts
(NFS), and a missing one must fail the replica at once with the host named,
not after Serve restarted it again and again. vLLM would find the same faults,
but only deep in engine start and with messages that do not name the spec key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Where multimodal configs keep their language model's sizes (Qwen2.5-VL in
#: transformers >= 4.5x: text_config; MiniCPM-o/InternVL style: llm_config).
_TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")


def read_config(model_dir: str | Path) -> dict[str, Any] | None:
    """``config.json`` of a local model directory; None when there is none to read."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _text_value(config: dict[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    for sub in _TEXT_CONFIG_KEYS:
        if isinstance(config.get(sub), dict) and key in config[sub]:
            return config[sub][key]
    return None


def parallelism_problems(config: dict[str, Any], tp: int, pp: int) -> list[tuple[str, str, str]]:
    """``(key, problem, fix)`` for each way TP x PP cannot split this model (vLLM 0.26's rules)."""
    out: list[tuple[str, str, str]] = []
    heads = _text_value(config, "num_attention_heads")
    kv_heads = _text_value(config, "num_key_value_heads") or heads
    layers = _text_value(config, "num_hidden_layers")
    if isinstance(heads, int) and heads % tp:
        out.append(("tensor_parallel_size",
                    f"tensor_parallel_size={tp} does not divide the model's {heads} attention heads",
                    f"use a divisor of {heads}: " + ", ".join(str(d) for d in _divisors(heads) if d <= 16)))
    # vLLM splits KV heads across ranks, or replicates them when TP is a multiple of their count.
    if isinstance(kv_heads, int) and kv_heads and (kv_heads % tp if tp <= kv_heads else tp % kv_heads):
        out.append(("tensor_parallel_size",
                    f"tensor_parallel_size={tp} neither divides nor is a multiple of the model's {kv_heads} KV heads",
                    f"use a divisor or a multiple of {kv_heads}"))
    if isinstance(layers, int) and pp > layers:
        out.append(("pipeline_parallel_size",
                    f"pipeline_parallel_size={pp} is more than the model's {layers} layers",
                    f"use pipeline_parallel_size <= {layers}"))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def input_modalities(config: dict[str, Any] | None, image_limit: int | None) -> list[str]:
    """What the model takes: text, plus image/audio when its config has those towers."""
    modalities = ["text"]
    if (config and "vision_config" in config) or image_limit:
        modalities.append("image")
    if config and "audio_config" in config:
        modalities.append("audio")
    return modalities
