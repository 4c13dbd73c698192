"""``fleetserve make-model``: model directories built locally, checked with the real loaders.

The fast tests load what make-model wrote with ``transformers`` (AutoConfig,
AutoTokenizer, AutoProcessor) exactly as vLLM does; the slow test runs vLLM
(CPU) offline on the tiny MiniCPM-o with a text and an image chat. The tiny
Qwen2.5-VL is served through vLLM by tests/test_serving.py, which also reads
back the image's prompt token ids (one engine start fewer in the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.modelgen import ModelGenError, make_model
from tinyqwen2 import CPU_ENGINE_ENV

QWEN_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
    "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
    "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662, "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model("qwen2_5_vl", "tiny", tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture(scope="module")
def dir_7b(tmp_path_factory) -> Path:
    return make_model("qwen2_5_vl", "7b", tmp_path_factory.mktemp("m") / "7b")


@pytest.fixture(scope="module")
def dir_32b(tmp_path_factory) -> Path:
    return make_model("qwen2_5_vl", "32b", tmp_path_factory.mktemp("m") / "32b")


def test_tiny_files_present(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    for required in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "preprocessor_config.json", "chat_template.jinja", "model.safetensors"):
        assert required in names, required
    # Small enough for a CPU and for CI.
    assert (tiny_dir / "model.safetensors").stat().st_size < 64 << 20


def test_tiny_config_is_the_real_architecture(tiny_dir: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert cfg.model_type == "qwen2_5_vl"
    assert cfg.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    text = cfg.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 64  # vLLM's CPU attention refuses small head dims
    # mrope sections split the rotary half of the head dim (t, h, w).
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.vocab_size > max(QWEN_SPECIALS.values())
    assert cfg.vision_config.out_hidden_size == text.hidden_size
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)


def test_tiny_weights_cover_every_parameter(tiny_dir: Path) -> None:
    """Every tensor the HF model class declares is in the checkpoint, under the published names."""
    import math

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        written = sum(math.prod(f.get_slice(n).get_shape()) for n in names)
    assert "model.embed_tokens.weight" in names and "visual.patch_embed.proj.weight" in names
    assert "visual.merger.mlp.2.weight" in names
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(tiny_dir))
    # What make-model wrote is exactly what the config declares (tied weights counted once by both).
    assert written == sum(p.numel() for p in model.parameters()), written
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]


def test_tokenizer_round_trip_and_real_special_ids(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ("Hello, world!", "Héllo wörld — 你好 🙂\n\ttabs", "a<|im_start|>b"):
        assert tok.decode(tok.encode(text)) == text
    for content, token_id in QWEN_SPECIALS.items():
        assert tok.convert_tokens_to_ids(content) == token_id, content
        assert tok.encode(content) == [token_id], content
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders_images_and_generation_prompt(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": [
        {"type": "image"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "video"}, {"type": "text", "text": "What is this?"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # A given system turn replaces the default; no generation prompt when not asked.
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    numbered = tok.apply_chat_template(msgs, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Picture 2: " in numbered and "Video 1: " in numbered


def test_processor_expands_image_placeholder(tiny_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir)
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True)
    out = proc(text=[prompt], images=[Image.new("RGB", (224, 168), (10, 20, 30))], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    # 224x168 px -> 16x12 patches of 14 px -> 2x2 merge -> 48 image tokens.
    assert (t, h, w) == (1, 12, 16)
    assert int((out["input_ids"] == 151655).sum()) == t * h * w // 4


@pytest.mark.parametrize(("fixture", "expected"), [
    ("dir_7b", {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                "intermediate_size": 18944, "vision_intermediate": 3420, "params_b": (8.2, 8.4)}),
    ("dir_32b", {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                 "intermediate_size": 27648, "vision_intermediate": 3456, "params_b": (33.3, 33.6)}),
])
def test_real_sizes_config_only(fixture: str, expected: dict, request) -> None:
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    path: Path = request.getfixturevalue(fixture)
    assert not list(path.glob("*.safetensors"))  # for load_format: dummy
    cfg = AutoConfig.from_pretrained(path)
    text = cfg.text_config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size"):
        assert getattr(text, key) == expected[key], key
    assert text.vocab_size == 152064 and text.rope_parameters["rope_theta"] == 1000000.0
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert cfg.tie_word_embeddings is False
    vis = cfg.vision_config
    assert (vis.depth, vis.hidden_size, vis.num_heads, vis.intermediate_size) == (32, 1280, 16,
                                                                                   expected["vision_intermediate"])
    assert vis.fullatt_block_indexes == [7, 15, 23, 31] and vis.window_size == 112
    assert vis.out_hidden_size == expected["hidden_size"]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    lo, hi = expected["params_b"]
    assert lo < params_b < hi, params_b
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_bad_arguments_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelGenError, match="unknown --arch"):
        make_model("llama", "tiny", tmp_path / "x")
    with pytest.raises(ModelGenError, match="unknown --size"):
        make_model("qwen2_5_vl", "3b", tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelGenError, match="not a directory"):
        make_model("qwen2_5_vl", "7b", tmp_path / "file")


def test_cli_make_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cluster.cli import app

    res = CliRunner().invoke(app, ["make-model", "--arch", "qwen2_5_vl", "--size", "7b", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "config.json").exists()
    res = CliRunner().invoke(app, ["make-model", "--arch", "nope", "--size", "7b", "--out", str(tmp_path / "n")])
    assert res.exit_code == 1 and "unknown --arch" in res.output


VLLM_SCRIPT = textwrap.dedent("""
    import base64, io, json, sys
    from PIL import Image
    from vllm import LLM, SamplingParams

    def main(path, size):
        llm = LLM(model=path, trust_remote_code=True, max_model_len=2048, max_num_seqs=2, enforce_eager=True,
                  seed=0, limit_mm_per_prompt={"image": 2, "video": 0, **json.loads(sys.argv[3])},
                  kv_cache_memory_bytes=256 << 20)
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        text = llm.chat([{"role": "user", "content": "Hello there"}], sp)[0]
        buf = io.BytesIO()
        Image.new("RGB", json.loads(size), (200, 30, 30)).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        image = llm.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]}], sp)[0]
        print("RESULT " + json.dumps({
            "text_tokens": list(text.outputs[0].token_ids),
            "image_prompt_ids": list(image.prompt_token_ids),
            "image_tokens": list(image.outputs[0].token_ids),
        }))

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
""")


def run_vllm(model: Path, tmp_path: Path, image_size: tuple[int, int], limits: dict | None = None) -> dict:
    """Run vLLM offline in a fresh interpreter (vLLM spawns workers; keep them out of pytest)."""
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(model), json.dumps(list(image_size)),
                           json.dumps(limits or {})], capture_output=True, text=True, timeout=1400,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": CPU_ENGINE_ENV["TORCHDYNAMO_DISABLE"]})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert len(res["text_tokens"]) == 8 and len(res["image_tokens"]) == 8
    return res


# --- MiniCPM-o 2.6 ------------------------------------------------------------------------------

MINICPM_IDS = {"<unk>": 151665, "<image>": 151666, "</image>": 151667, "<slice>": 151676, "</slice>": 151677,
               "<image_id>": 151678, "</image_id>": 151679, "<|audio_start|>": 151686, "<|audio_end|>": 151688,
               "<|spk_bos|>": 151689, "<|spk_eos|>": 151691, "<|tts_bos|>": 151692, "<|tts_eos|>": 151693}


@pytest.fixture(scope="module")
def minicpm_tiny(tmp_path_factory) -> Path:
    return make_model("minicpm_o_26", "tiny", tmp_path_factory.mktemp("m") / "minicpm-tiny", seed=0)


def test_minicpm_files_and_remote_config(minicpm_tiny: Path) -> None:
    from transformers import AutoConfig

    for name in ("config.json", "configuration_minicpmo.py", "tokenization_minicpmo_fast.py",
                 "image_processing_minicpmv.py", "processing_minicpmo.py", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (minicpm_tiny / name).exists(), name
    cfg = AutoConfig.from_pretrained(minicpm_tiny, trust_remote_code=True)
    assert type(cfg).__name__ == "MiniCPMOConfig" and cfg.architectures == ["MiniCPMO"]
    assert str(cfg.version) == "2.6" and cfg.query_num == 64 and cfg.hidden_size % 128 == 0
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.vision_config.patch_size == 14 and cfg.slice_config.max_slice_nums == 9
    assert cfg.audio_config.encoder_ffn_dim // 4 == cfg.audio_config.d_model


def test_minicpm_tokenizer_markers(minicpm_tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minicpm_tiny, trust_remote_code=True)
    for content, token_id in {**QWEN_SPECIALS, **MINICPM_IDS}.items():
        assert tok.convert_tokens_to_ids(content) == token_id, content
    assert (tok.im_start_id, tok.im_end_id, tok.slice_start_id, tok.slice_end_id) == (151666, 151667, 151676, 151677)
    assert (tok.audio_start_id, tok.audio_end_id, tok.spk_start_id, tok.spk_end_id) == (151686, 151688, 151689, 151691)
    assert tok.unk_token == "<unk>" and tok.eos_token == "<|im_end|>"
    text = "(<image>./</image>)\nwhat is <unk> 你好?"
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        + text + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("size", "grid"), [((448, 448), None), ((1000, 700), (2, 2)), ((448, 4032), (1, 9)),
                                            ((3000, 400), (7, 1))])
def test_minicpm_processor_slices(minicpm_tiny: Path, size: tuple[int, int], grid) -> None:
    """Views, tgt_sizes and the <unk> count agree with vLLM's formula (cols * rows + 1) * query_num."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(minicpm_tiny, trust_remote_code=True)
    ip = proc.image_processor
    assert ip.get_sliced_grid(size) == grid
    out = proc("(<image>./</image>)\nwhat?", images=[Image.new("RGB", size, (1, 2, 3))])
    views = 1 + (grid[0] * grid[1] if grid else 0)
    assert len(out["pixel_values"][0]) == views and out["tgt_sizes"][0].shape == (views, 2)
    for pixels, (rows, cols) in zip(out["pixel_values"][0], out["tgt_sizes"][0].tolist()):
        assert pixels.shape == (3, 14, rows * cols * 14)
    unk = proc.tokenizer.unk_id
    assert int((out["input_ids"][0] == unk).sum()) == views * 64
    bounds = out["image_bound"][0]
    assert bounds.shape == (views, 2) and all(int(e - s) == 64 for s, e in bounds.tolist())
    assert out["input_ids"][0].tolist().count(MINICPM_IDS["<image_id>"]) == 1


def test_minicpm_8b_config_only() -> None:
    import tempfile

    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    with tempfile.TemporaryDirectory() as d:
        path = make_model("minicpm_o_26", "8b", Path(d) / "8b")
        assert not list(path.glob("*.safetensors"))
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
        raw = json.loads((path / "config.json").read_text())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (3584, 28, 28, 4, 18944, 151700)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.image_size) == (
        1152, 27, 980)
    assert (cfg.audio_config.d_model, cfg.audio_config.encoder_layers) == (1024, 24)
    # The language model as the written config.json describes it (MiniCPM-o's LLM is a Qwen2).
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(Qwen2Config(**{k: raw[k] for k in text_keys if k in raw}))
    assert 7.5e9 < sum(p.numel() for p in llm.parameters()) < 7.7e9


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_vllm_cpu_minicpm_o_text_and_image(minicpm_tiny: Path, tmp_path: Path) -> None:
    """vLLM (CPU) runs tiny MiniCPM-o through its MiniCPMO model with our remote code, text and image."""
    ids = run_vllm(minicpm_tiny, tmp_path, (1000, 700), {"audio": 0})["image_prompt_ids"]
    # 1000x700 -> source view + 2x2 slices, 64 <unk> each.
    assert ids.count(MINICPM_IDS["<unk>"]) == 5 * 64
    assert ids.count(MINICPM_IDS["<slice>"]) == 4 and ids.count(MINICPM_IDS["<image>"]) == 1
