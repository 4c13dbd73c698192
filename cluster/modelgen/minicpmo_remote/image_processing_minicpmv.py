"""MiniCPM-V/o slicing image processor (fleetserve's own module, loaded with trust_remote_code).

An image becomes one downscaled "source" view plus, when it is larger than
``scale_resolution``^2 pixels, a grid of up to ``max_slice_nums`` slices that
follows its aspect ratio. Every view is resized to multiples of
``patch_size``, normalised, and laid out patch by patch as a
``(3, patch_size, n_patches * patch_size)`` array; ``tgt_sizes`` holds each
view's patch grid (rows, cols). In the prompt, each view is
``image_feature_size`` ``<unk>`` tokens between ``<image>``/``</image>``
(source) or ``<slice>``/``</slice>`` (slices), which vLLM replaces by the
resampler's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


def _size_of(image_size: Any) -> tuple[int, int]:
    """(width, height) from a PIL size tuple, vLLM's ImageSize, a list or a tensor."""
    if hasattr(image_size, "width"):
        return int(image_size.width), int(image_size.height)
    w, h = (image_size.tolist() if hasattr(image_size, "tolist") else image_size)[:2]
    return int(w), int(h)


def _round_to(length: float, unit: int) -> int:
    return max(round(length / unit) * unit, unit)


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        image_feature_size: int = 64,
        use_image_id: bool = True,
        slice_mode: bool = True,
        norm_mean: Sequence[float] = (0.5, 0.5, 0.5),
        norm_std: Sequence[float] = (0.5, 0.5, 0.5),
        im_start: str = "<image>",
        im_end: str = "</image>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        unk: str = "<unk>",
        im_id_start: str = "<image_id>",
        im_id_end: str = "</image_id>",
        version: float | str = 2.6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.use_image_id = use_image_id
        self.slice_mode = slice_mode
        self.mean = list(norm_mean)
        self.std = list(norm_std)
        self.im_start_token, self.im_end_token = im_start, im_end
        self.slice_start_token, self.slice_end_token = slice_start, slice_end
        self.unk_token = unk
        self.im_id_start, self.im_id_end = im_id_start, im_id_end
        self.version = version

    # -- geometry -------------------------------------------------------------------------------

    def get_sliced_grid(self, image_size: Any, max_slice_nums: int | None = None,
                        nerver_split: bool = False) -> tuple[int, int] | None:
        """(cols, rows) of the slice grid, or None when the image is used whole."""
        max_slices = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        w, h = _size_of(image_size)
        wanted = min(math.ceil(w * h / self.scale_resolution**2), max_slices)
        if wanted <= 1 or nerver_split or not self.slice_mode:
            return None
        grids = [(cols, n // cols)
                 for n in (wanted - 1, wanted, wanted + 1) if 1 < n <= max_slices
                 for cols in range(1, n + 1) if n % cols == 0]
        aspect = math.log(w / h)
        return min(grids, key=lambda g: abs(aspect - math.log(g[0] / g[1])))

    def _fit(self, w: int, h: int, allow_upscale: bool) -> tuple[int, int]:
        """Scale to about scale_resolution^2 pixels (keeping the aspect), in whole patches."""
        if allow_upscale or w * h > self.scale_resolution**2:
            aspect = w / h
            h = int(self.scale_resolution / math.sqrt(aspect))
            w = int(h * aspect)
        return _round_to(w, self.patch_size), _round_to(h, self.patch_size)

    def _views(self, image: Image.Image, max_slice_nums: int | None) -> list[Image.Image]:
        grid = self.get_sliced_grid(image.size, max_slice_nums)
        if grid is None:
            return [image.resize(self._fit(*image.size, allow_upscale=True), Image.Resampling.BICUBIC)]
        views = [image.resize(self._fit(*image.size, allow_upscale=False), Image.Resampling.BICUBIC)]
        cols, rows = grid
        cell_w, cell_h = self._fit(_round_to(image.width, cols) // cols, _round_to(image.height, rows) // rows,
                                   allow_upscale=True)
        refined = image.resize((cell_w * cols, cell_h * rows), Image.Resampling.BICUBIC)
        for r in range(rows):
            for c in range(cols):
                views.append(refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)))
        return views

    def _patch_rows(self, view: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """Normalise one view and lay its patches side by side: (3, p, n_patches * p)."""
        p = self.patch_size
        arr = np.asarray(view, dtype=np.float32) / 255.0
        arr = ((arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).transpose(2, 0, 1)
        rows, cols = arr.shape[1] // p, arr.shape[2] // p
        arr = arr[:, : rows * p, : cols * p].reshape(3, rows, p, cols, p).transpose(0, 2, 1, 3, 4)
        return np.ascontiguousarray(arr.reshape(3, p, rows * cols * p)), (rows, cols)

    # -- prompt text ------------------------------------------------------------------------------

    def _slot(self, start: str, end: str) -> str:
        return start + self.unk_token * self.image_feature_size + end

    def get_slice_image_placeholder(self, image_size: Any, image_idx: int = 0, max_slice_nums: int | None = None,
                                    use_image_id: bool | None = None) -> str:
        use_id = self.use_image_id if use_image_id is None else use_image_id
        text = self._slot(self.im_start_token, self.im_end_token)
        if use_id:
            text = f"{self.im_id_start}{image_idx}{self.im_id_end}" + text
        grid = self.get_sliced_grid(image_size, max_slice_nums)
        if grid is not None:
            cols, rows = grid
            row = self._slot(self.slice_start_token, self.slice_end_token) * cols
            text += "\n".join([row] * rows)
        return text

    # -- pixels -----------------------------------------------------------------------------------

    def preprocess(self, images, do_pad: bool = True, max_slice_nums: int | None = None,
                   return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """``images``: one image, a list (one sample) or a list of lists (a batch of samples)."""
        if isinstance(images, Image.Image):
            batch = [[images]]
        elif images and isinstance(images[0], Image.Image):
            batch = [list(images)]
        else:
            batch = [list(sample) for sample in images]
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for sample in batch:
            views, sizes, grids = [], [], []
            for image in sample:
                image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
                image = image.convert("RGB")
                sizes.append(image.size)
                for view in self._views(image, max_slice_nums):
                    arr, grid = self._patch_rows(view)
                    views.append(arr)
                    grids.append(grid)
            pixel_values.append(views)
            image_sizes.append(sizes)
            tgt_sizes.append(np.asarray(grids, dtype=np.int32).reshape(-1, 2))
        if return_tensors in ("pt", "torch") or getattr(return_tensors, "value", None) == "pt":
            import torch

            pixel_values = [[torch.from_numpy(v) for v in views] for views in pixel_values]
            image_sizes = [[torch.tensor(s) for s in sizes] for sizes in image_sizes]
            tgt_sizes = [torch.from_numpy(t) for t in tgt_sizes]
        # Ragged nesting: keep it as built (BatchFeature's own conversion wants rectangular data).
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes, "tgt_sizes": tgt_sizes})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
