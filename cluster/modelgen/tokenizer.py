"""Byte-level BPE tokenizers whose special tokens sit at a model's real ids.

No tokenizer can be downloaded here, yet the config of a multimodal model
names token ids (``image_token_id`` ...) and vLLM looks placeholders up by
text. ``tokenizers`` builds the vocabulary: the 256 byte symbols (so any
UTF-8 text encodes and decodes exactly), filler entries up to the first
special id, then the special tokens in id order. The merges are empty: text
costs one token per byte, which only matters for prompt length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Qwen2.5 family added tokens at their real ids (Qwen2.5 / Qwen2.5-VL tokenizer_config.json);
# True = special (stripped by skip_special_tokens).
QWEN25_SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}


def build_bytelevel_tokenizer(specials: dict[int, tuple[str, bool]]):
    """A ``tokenizers.Tokenizer`` with byte symbols and ``specials`` at exactly their ids.

    Ids between the byte symbols and the first special token are filler
    entries (never produced by encoding text); gaps between special ids are
    filled the same way.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    first = min(specials)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), first):
        vocab[f"<|fleetserve_filler_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    next_id = first
    for token_id in sorted(specials):
        while next_id < token_id:  # a gap in the real layout: keep later ids exact
            tok.add_tokens([AddedToken(f"<|fleetserve_reserved_{next_id}|>", special=True, normalized=False)])
            next_id += 1
        content, special = specials[token_id]
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        got = tok.token_to_id(content)
        if got != token_id:
            raise RuntimeError(f"tokenizer layout broke: {content!r} got id {got}, expected {token_id}")
        next_id += 1
    return tok


def added_tokens_decoder(specials: dict[int, tuple[str, bool]]) -> dict[str, dict[str, Any]]:
    return {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": special}
        for i, (c, special) in sorted(specials.items())
    }


def write_tokenizer(out: Path, specials: dict[int, tuple[str, bool]], config: dict[str, Any],
                    chat_template: str) -> None:
    """Write tokenizer.json, tokenizer_config.json (``config`` on top), chat_template.jinja, special_tokens_map.json."""
    build_bytelevel_tokenizer(specials).save(str(out / "tokenizer.json"))
    full = {
        "added_tokens_decoder": added_tokens_decoder(specials),
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        **config, "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(full, indent=2))
    (out / "chat_template.jinja").write_text(chat_template)
    keys = ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: full[k] for k in keys if full.get(k) is not None}, indent=2))
