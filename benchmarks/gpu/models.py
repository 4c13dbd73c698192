"""Model directories for the GPU benchmarks: real architectures, dummy weights.

No weights can be downloaded on the device machines, and vLLM's
``load_format="dummy"`` only needs the architecture's ``config.json``; the
benchmarks feed prompt token ids with ``skip_tokenizer_init``. When
``fleetserve make-model`` (cluster/modelgen) is available it is used instead,
so the benchmarks and the serving tests share one source of model configs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# Qwen2.5-VL-7B/32B-Instruct, text model + vision tower as published.
_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "in_chans": 3, "num_heads": 16,
    "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    "tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "model_type": "qwen2_5_vl",
}
ARCHS: dict[str, dict[str, Any]] = {
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4,
           "vision": {"intermediate_size": 3420, "out_hidden_size": 3584}},
    "32b": {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
            "num_attention_heads": 40, "num_key_value_heads": 8,
            "vision": {"intermediate_size": 3456, "out_hidden_size": 5120}},
}


def qwen2_5_vl_config(size: str) -> dict[str, Any]:
    a = ARCHS[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": a["hidden_size"], "initializer_range": 0.02, "intermediate_size": a["intermediate_size"],
        "max_position_embeddings": 128000, "max_window_layers": a["num_hidden_layers"],
        "num_attention_heads": a["num_attention_heads"], "num_hidden_layers": a["num_hidden_layers"],
        "num_key_value_heads": a["num_key_value_heads"], "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {**_VISION, **a["vision"]},
    }


def qwen2_config(size: str) -> dict[str, Any]:
    """Qwen2.5-7B text model (standard RoPE, the LLM inside MiniCPM-o 2.6)."""
    c = qwen2_5_vl_config(size)
    for k in ("rope_scaling", "vision_config", "vision_start_token_id", "vision_end_token_id",
              "vision_token_id", "image_token_id", "video_token_id"):
        c.pop(k)
    c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=32768)
    return c


def make_model_dir(size: str, out: Path) -> Path:
    """A model dir of the real architecture; prefers ``fleetserve make-model``."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    try:
        if size.startswith("q2_"):
            raise ImportError("make-model builds qwen2_5_vl only")
        from cluster.modelgen import __name__ as _  # noqa: F401  (landed?)

        subprocess.run([sys.executable, "-m", "cluster.cli", "make-model", "--arch", "qwen2_5_vl",
                        "--size", size, "--out", str(out)], check=True)
        if (out / "config.json").exists():
            return out
    except Exception:
        pass
    out.mkdir(parents=True, exist_ok=True)
    cfg = qwen2_config(size[3:]) if size.startswith("q2_") else qwen2_5_vl_config(size)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    return out


if __name__ == "__main__":
    print(make_model_dir(sys.argv[1], Path(sys.argv[2])))
