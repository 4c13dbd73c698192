"""MiniCPM-o 2.6 tokenizer (fleetserve's own module, loaded with trust_remote_code).

A Qwen2 fast tokenizer that exposes the marker tokens MiniCPM-o's processing
looks up by attribute (``im_start_id``, ``slice_start_id``, ``audio_start_id``,
``spk_start_id`` ...), resolved from the vocabulary rather than hard-coded.
"""

from __future__ import annotations

from transformers import Qwen2TokenizerFast

_MARKERS = {
    "im_start": "<image>", "im_end": "</image>",
    "ref_start": "<ref>", "ref_end": "</ref>",
    "box_start": "<box>", "box_end": "</box>",
    "quad_start": "<quad>", "quad_end": "</quad>",
    "slice_start": "<slice>", "slice_end": "</slice>",
    "im_id_start": "<image_id>", "im_id_end": "</image_id>",
    "audio_start": "<|audio_start|>", "audio_end": "<|audio_end|>",
    "spk_start": "<|spk_bos|>", "spk_end": "<|spk_eos|>",
    "tts_start": "<|tts_bos|>", "tts_end": "<|tts_eos|>",
}


class MiniCPMOTokenizerFast(Qwen2TokenizerFast):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for attr, token in _MARKERS.items():
            setattr(self, attr, token)
        self.image_tag = "(<image>./</image>)"
        self.audio_tag = "(<audio>./</audio>)"
        self.terminator_tokens = ["<|im_end|>", "<|endoftext|>", "<|tts_eos|>"]

    def _id(self, token: str) -> int:
        return self.convert_tokens_to_ids(token)

    @property
    def eos_id(self) -> int:
        return self.eos_token_id

    @property
    def bos_id(self) -> int | None:
        return self.bos_token_id

    @property
    def unk_id(self) -> int:
        return self._id("<unk>")

    @property
    def im_start_id(self) -> int:
        return self._id(self.im_start)

    @property
    def im_end_id(self) -> int:
        return self._id(self.im_end)

    @property
    def slice_start_id(self) -> int:
        return self._id(self.slice_start)

    @property
    def slice_end_id(self) -> int:
        return self._id(self.slice_end)

    @property
    def im_id_start_id(self) -> int:
        return self._id(self.im_id_start)

    @property
    def im_id_end_id(self) -> int:
        return self._id(self.im_id_end)

    @property
    def audio_start_id(self) -> int:
        return self._id(self.audio_start)

    @property
    def audio_end_id(self) -> int:
        return self._id(self.audio_end)

    @property
    def spk_start_id(self) -> int:
        return self._id(self.spk_start)

    @property
    def spk_end_id(self) -> int:
        return self._id(self.spk_end)

    @property
    def tts_start_id(self) -> int:
        return self._id(self.tts_start)

    @property
    def tts_end_id(self) -> int:
        return self._id(self.tts_end)
