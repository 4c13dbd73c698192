"""Qwen2.5-VL model directories: tiny (random weights, CPU) and the published 7B / 32B configs.

* config.json comes from ``transformers``' own ``Qwen2_5_VLConfig`` filled
  with the published hyper-parameters (Qwen2.5-VL-7B-Instruct and
  -32B-Instruct config.json); ``tiny`` is the same architecture shrunk until
  a CPU runs it (head_dim 64: vLLM's CPU attention refuses small head dims).
* the tokenizer is byte-level with Qwen2.5's special tokens at their real ids
  (``tokenizer.py``), with a chat template written here that behaves like
  Qwen2.5-VL's;
* ``tiny`` also gets random weights, written by instantiating the
  ``transformers`` model class, so every tensor has the name and shape of the
  published checkpoints (``model.layers.*``, ``visual.*``), which is what
  vLLM's loader maps from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.modelgen.tokenizer import QWEN25_SPECIAL_TOKENS, write_tokenizer

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151655, 151656
VISION_START_ID, VISION_END_ID, VISION_PAD_ID = 151652, 151653, 151654
BOS_ID, EOS_ID = 151643, 151645

# Written for fleetserve with the behaviour of Qwen2.5-VL's template: a default
# system turn, images/videos as <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands <|image_pad|> to the image's patch count).
QWEN25_VL_CHAT_TEMPLATE = (
    # Every literal is emitted through {{ '...' }} so whitespace control never eats a newline.
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class QwenVLSize:
    """Hyper-parameters of one Qwen2.5-VL size (text decoder + vision tower)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    max_position_embeddings: int
    max_window_layers: int
    vision: dict[str, Any] = field(default_factory=dict)
    with_weights: bool = False
    max_pixels: int = 12845056  # the published preprocessor_config.json value


# The vision tower is the same in 7B and 32B but for the MLP width and the merger output.
_VISION_REAL: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "num_heads": 16, "patch_size": 14, "spatial_patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2, "hidden_act": "silu", "in_chans": 3, "in_channels": 3,
}
SIZES: dict[str, QwenVLSize] = {
    # 2 text layers, hidden 128, 2 heads of 64, 1 KV head; a 2-block vision tower of width 128.
    # mrope sections (t, h, w) split the rotary half of head_dim: 8 + 12 + 12 = 32.
    "tiny": QwenVLSize(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=151936, mrope_section=(8, 12, 12), tie_word_embeddings=True,
        max_position_embeddings=32768, max_window_layers=2,
        vision={**_VISION_REAL, "depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2,
                "out_hidden_size": 128, "fullatt_block_indexes": [1]},
        # 512 merged image tokens at most per image: keeps vLLM's encoder profiling short on a CPU.
        with_weights=True, max_pixels=401408,
    ),
    # Qwen2.5-VL-7B-Instruct config.json.
    "7b": QwenVLSize(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, mrope_section=(16, 24, 24), tie_word_embeddings=False,
        max_position_embeddings=128000, max_window_layers=28,
        vision={**_VISION_REAL, "intermediate_size": 3420, "out_hidden_size": 3584},
    ),
    # Qwen2.5-VL-32B-Instruct config.json.
    "32b": QwenVLSize(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, mrope_section=(16, 24, 24), tie_word_embeddings=False,
        max_position_embeddings=128000, max_window_layers=64,
        vision={**_VISION_REAL, "intermediate_size": 3456, "out_hidden_size": 5120},
    ),
}


def qwen25_vl_config(size: str):
    """The ``transformers`` ``Qwen2_5_VLConfig`` of one size."""
    from transformers import Qwen2_5_VLConfig

    s = SIZES[size]
    text = {
        "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": s.max_position_embeddings, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": s.max_window_layers,
        "attention_dropout": 0.0, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(s.mrope_section)},
        "tie_word_embeddings": s.tie_word_embeddings,
    }
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(s.vision),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=s.tie_word_embeddings,
    )
    cfg.vision_token_id = VISION_PAD_ID  # published configs carry it; nothing reads it
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    return cfg


def write_qwen_tokenizer(out: Path, chat_template: str, model_max_length: int) -> None:
    specials = [c for _, (c, special) in sorted(QWEN25_SPECIAL_TOKENS.items()) if special]
    write_tokenizer(out, QWEN25_SPECIAL_TOKENS, {
        "tokenizer_class": "Qwen2TokenizerFast",
        "additional_special_tokens": specials[1:],  # as published: the special ones but <|endoftext|>
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": model_max_length,
    }, chat_template)


def write_processor(out: Path, max_pixels: int) -> None:
    """Qwen2-VL image and video processor configs (the published values; tiny lowers max_pixels)."""
    common = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 0.00392156862745098, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "min_pixels": 3136, "max_pixels": max_pixels, "processor_class": "Qwen2_5_VLProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", **common}, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", **common}, indent=2))


def write_random_weights(cfg, out: Path, seed: int) -> None:
    """Random bf16 weights under the tensor names of the published checkpoints."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                # Small weights keep activations finite in bf16 through random layers.
                p.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    cfg.save_pretrained(out)  # save_pretrained rewrote config.json from the model; keep ours


def make(size: str, out: Path, seed: int) -> Path:
    spec = SIZES[size]
    cfg = qwen25_vl_config(size)
    cfg.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "pad_token_id": BOS_ID,
        "do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05,
    }, indent=2))
    write_qwen_tokenizer(out, QWEN25_VL_CHAT_TEMPLATE, spec.max_position_embeddings)
    write_processor(out, spec.max_pixels)
    if spec.with_weights:
        write_random_weights(cfg, out, seed)
    return out
