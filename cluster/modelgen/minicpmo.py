"""MiniCPM-o 2.6 model directories: tiny (random weights, CPU) and 8b (the published config, no weights).

vLLM serves MiniCPM-o through its ``MiniCPMO`` model, but the configuration,
tokenizer and image-processor classes come from the model directory
(``trust_remote_code``). OpenBMB's modules cannot be downloaded here, so
``minicpmo_remote/`` holds our own (see its docstring); this module copies
them next to config.json and writes the files that point at them
(``auto_map``), a byte-level tokenizer with Qwen2.5's and MiniCPM-o's added
tokens, the chat template, the processor config and, for ``tiny``, random
weights under the published checkpoint names (``llm.*``, ``vpm.*``,
``resampler.*``, ``apm.*``, ``audio_projection_layer.*``).

The ids of MiniCPM-o's own added tokens (``<unk>``, ``<image>``, ``<slice>``,
audio markers ...) follow Qwen2.5's from 151665 on, in MiniCPM-o's order,
inside its 151700-token vocabulary; vLLM looks them up by text, so a
directory made here is consistent with itself. Real weights need OpenBMB's
tokenizer files (docs/models.md).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.modelgen.tokenizer import QWEN25_SPECIAL_TOKENS, write_tokenizer

REMOTE_DIR = Path(__file__).with_name("minicpmo_remote")
REMOTE_FILES = ("configuration_minicpmo.py", "tokenization_minicpmo_fast.py", "image_processing_minicpmv.py",
                "processing_minicpmo.py")

MINICPM_ADDED = (
    "<unk>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>",
    "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unit>", "</unit>", "<asr>", "</asr>",
    "<query>", "</query>", "<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>",
    "<|spk_eos|>", "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>",
    "<|vad_end|>",
)
SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    **QWEN25_SPECIAL_TOKENS,
    **{151665 + i: (tok, True) for i, tok in enumerate(MINICPM_ADDED)},
}
VOCAB_SIZE = 151700

# MiniCPM-o's chat format (Qwen's): vLLM puts "(<image>./</image>)" into the user text for each image.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class MiniCPMOSize:
    text: dict[str, Any]
    vision: dict[str, Any]
    audio: dict[str, Any]
    query_num: int
    with_weights: bool


# Whisper-medium's encoder, which MiniCPM-o 2.6 uses as its audio tower.
_WHISPER_MEDIUM = {
    "d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
    "decoder_layers": 24, "decoder_attention_heads": 16, "decoder_ffn_dim": 4096, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865, "activation_function": "gelu",
}
SIZES: dict[str, MiniCPMOSize] = {
    # Qwen2.5-7B text model + SigLIP-400M (27 layers) + Whisper-medium encoder: MiniCPM-o-2_6's config.json.
    "8b": MiniCPMOSize(
        text={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "max_position_embeddings": 32768, "max_window_layers": 28,
              "tie_word_embeddings": False},
        vision={"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "num_attention_heads": 16,
                "num_hidden_layers": 27, "patch_size": 14},
        audio=_WHISPER_MEDIUM, query_num=64, with_weights=False,
    ),
    # hidden 128 (the resampler uses hidden // 128 heads), head_dim 64 (vLLM's CPU attention).
    "tiny": MiniCPMOSize(
        text={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 32768, "max_window_layers": 2,
              "tie_word_embeddings": False},
        vision={"hidden_size": 128, "image_size": 980, "intermediate_size": 256, "num_attention_heads": 2,
                "num_hidden_layers": 2, "patch_size": 14},
        audio={**_WHISPER_MEDIUM, "d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2,
               "encoder_ffn_dim": 256, "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 256},
        query_num=64, with_weights=True,
    ),
}


def config_dict(size: str) -> dict[str, Any]:
    """config.json of one size (checked by loading it through our configuration module)."""
    s = SIZES[size]
    return {
        "architectures": ["MiniCPMO"],
        "auto_map": {"AutoConfig": "configuration_minicpmo.MiniCPMOConfig"},
        "model_type": "minicpmo",
        "version": "2.6",
        **s.text,
        "vocab_size": VOCAB_SIZE, "hidden_act": "silu", "rms_norm_eps": 1e-6, "initializer_range": 0.02,
        "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 131072, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", "use_cache": True,
        "query_num": s.query_num, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False,
        "batch_vision_input": True, "use_image_id": True, "vision_batch_size": 16, "slice_mode": True,
        "slice_config": {"model_type": "minicpmv", "max_slice_nums": 9, "patch_size": 14, "scale_resolution": 448},
        "vision_config": {"model_type": "siglip_vision_model", **s.vision},
        "audio_config": {"model_type": "whisper", **s.audio},
        "audio_pool_step": 2, "audio_chunk_length": 1.0, "stream_input": False,
        "init_vision": True, "init_audio": True, "init_tts": False,
        "tts_config": {"model_type": "conditional_chattts", "llm_dim": s.text["hidden_size"]},
    }


def write_processor(out: Path, query_num: int) -> None:
    """preprocessor_config.json: the slicing image processor and Whisper's feature extractor share it."""
    (out / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
                     "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "processor_class": "MiniCPMOProcessor",
        "image_processor_type": "MiniCPMVImageProcessor",
        "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "image_feature_size": query_num,
        "use_image_id": True, "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>", "version": 2.6,
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
        "hop_length": 160, "chunk_length": 30, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
    }, indent=2))


def write_random_weights(size: str, out: Path, seed: int) -> int:
    """Random bf16 weights for every tensor vLLM's MiniCPMO loads (the speech decoder excepted).

    Names and shapes come from ``transformers``' Qwen2, SigLIP and Whisper
    modules (what the published checkpoint was saved from) plus the
    resampler and audio projector, whose shapes vLLM's MiniCPM-O code fixes.
    Returns the parameter count.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
        WhisperConfig,
    )
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    s = SIZES[size]
    cfg = config_dict(size)
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        text_cfg = Qwen2Config(**{k: v for k, v in cfg.items() if k in (
            *s.text, "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta")})
        modules = {
            "llm.": Qwen2ForCausalLM(text_cfg),
            "vpm.": SiglipVisionModel(SiglipVisionConfig(**s.vision, vision_use_head=False)),
            "apm.": WhisperEncoder(WhisperConfig(**s.audio)),
        }
        for prefix, module in modules.items():
            shapes.update({prefix + n: tuple(p.shape) for n, p in module.state_dict().items()})
    d, vd, q = s.text["hidden_size"], s.vision["hidden_size"], s.query_num
    audio_in = s.audio["encoder_ffn_dim"] // 4
    shapes.update({
        "resampler.query": (q, d), "resampler.proj": (d, d),
        "resampler.attn.in_proj_weight": (3 * d, d), "resampler.attn.in_proj_bias": (3 * d,),
        "resampler.attn.out_proj.weight": (d, d), "resampler.attn.out_proj.bias": (d,),
        **{f"resampler.{ln}.{w}": (d,) for ln in ("ln_q", "ln_kv", "ln_post") for w in ("weight", "bias")},
        "audio_projection_layer.linear1.weight": (d, audio_in), "audio_projection_layer.linear1.bias": (d,),
        "audio_projection_layer.linear2.weight": (d, d), "audio_projection_layer.linear2.bias": (d,),
    })
    if vd != d:
        shapes["resampler.kv_proj.weight"] = (d, vd)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sorted(shapes.items()):
        if "norm" in name or name.split(".")[-2].startswith("ln_"):
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            # Small weights keep activations finite in bf16 through random layers.
            t = torch.randn(shape, generator=gen) * 0.02
        tensors[name] = t.to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def make(size: str, out: Path, seed: int) -> Path:
    s = SIZES[size]
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, out / name)
    # transformers_version: without it transformers takes the directory for an old Mistral one and warns.
    cfg = {**config_dict(size), "transformers_version": importlib.metadata.version("transformers")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
    }, indent=2))
    auto_map = {"AutoTokenizer": [None, "tokenization_minicpmo_fast.MiniCPMOTokenizerFast"],
                "AutoProcessor": "processing_minicpmo.MiniCPMOProcessor"}
    write_tokenizer(out, SPECIAL_TOKENS, {
        "tokenizer_class": "MiniCPMOTokenizerFast", "auto_map": auto_map,
        "additional_special_tokens": [c for i, (c, sp) in sorted(SPECIAL_TOKENS.items()) if sp and i != 151643],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "model_max_length": s.text["max_position_embeddings"],
    }, CHAT_TEMPLATE)
    write_processor(out, s.query_num)
    if s.with_weights:
        write_random_weights(size, out, seed)
    return out
