"""MiniCPM-o 2.6 processor (fleetserve's own module, loaded with trust_remote_code).

Bundles the slicing image processor, Whisper's feature extractor and the
tokenizer. vLLM takes these three parts from it and runs its own MiniCPM-O
processing; ``__call__`` here serves plain ``transformers`` users for text
and images: each ``(<image>./</image>)`` tag becomes the image's slice
placeholders, and ``image_bound`` marks the ``<unk>`` runs the vision
features fill.
"""

from __future__ import annotations

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_TAG = "(<image>./</image>)"


class MiniCPMOProcessor(ProcessorMixin):
    attributes = ["image_processor", "feature_extractor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    feature_extractor_class = "WhisperFeatureExtractor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template)

    def __call__(self, text, images=None, audios=None, max_slice_nums=None, use_image_id=True,
                 return_tensors="pt", **kwargs) -> BatchFeature:
        if audios is not None:
            raise ValueError("audio input: serve this model with vLLM, whose MiniCPM-O processor handles audio")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            return BatchFeature(data=dict(self.tokenizer(texts, return_tensors=return_tensors, **kwargs)))
        pixels = self.image_processor(images, max_slice_nums=max_slice_nums, return_tensors=return_tensors)
        ids, bounds = [], []
        for i, sample in enumerate(texts):
            chunks = sample.split(IMAGE_TAG)
            if len(chunks) - 1 != len(pixels["image_sizes"][i]):
                raise ValueError(f"sample {i}: {len(chunks) - 1} image tags for {len(pixels['image_sizes'][i])} images")
            parts = [chunks[0]]
            for j, size in enumerate(pixels["image_sizes"][i]):
                parts.append(self.image_processor.get_slice_image_placeholder(
                    size, image_idx=j, max_slice_nums=max_slice_nums, use_image_id=use_image_id))
                parts.append(chunks[j + 1])
            sample_ids = torch.tensor(self.tokenizer.encode("".join(parts)), dtype=torch.int64)
            starts = torch.where((sample_ids == self.tokenizer.im_start_id)
                                 | (sample_ids == self.tokenizer.slice_start_id))[0] + 1
            ends = torch.where((sample_ids == self.tokenizer.im_end_id)
                               | (sample_ids == self.tokenizer.slice_end_id))[0]
            ids.append(sample_ids)
            bounds.append(torch.stack([starts, ends], dim=-1))
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, x in enumerate(ids):  # left padding, as MiniCPM does
            input_ids[i, width - len(x):] = x
            attention_mask[i, width - len(x):] = True
            bounds[i] = bounds[i] + (width - len(x))
        return BatchFeature(data={
            "input_ids": input_ids, "attention_mask": attention_mask, "image_bound": bounds,
            "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"],
            "tgt_sizes": pixels["tgt_sizes"],
        })
