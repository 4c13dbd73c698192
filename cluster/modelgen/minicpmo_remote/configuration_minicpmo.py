"""MiniCPM-o 2.6 configuration (fleetserve's own module, loaded with trust_remote_code).

A Qwen2 text config plus the vision tower (SigLIP), audio encoder (Whisper)
and the resampler / slicing settings that vLLM's ``MiniCPMO`` model reads:
``query_num``, ``image_size``, ``drop_vision_last_layer``, ``slice_config``,
``audio_pool_step``, ``audio_chunk_length`` and ``version``.
"""

from __future__ import annotations

from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig, WhisperConfig


class MiniCPMVSliceConfig(PretrainedConfig):
    """How an image is cut into slices of ``scale_resolution`` pixels (at most ``max_slice_nums``)."""

    model_type = "minicpmv"

    def __init__(self, patch_size: int = 14, max_slice_nums: int = 9, scale_resolution: int = 448, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution


class MiniCPMOConfig(Qwen2Config):
    model_type = "minicpmo"
    keys_to_ignore_at_inference = ["past_key_values"]
    sub_configs = {"vision_config": SiglipVisionConfig, "audio_config": WhisperConfig,
                   "slice_config": MiniCPMVSliceConfig}

    def __init__(
        self,
        use_cache: bool = True,
        query_num: int = 64,
        image_size: int = 448,
        drop_vision_last_layer: bool = True,
        batch_vision_input: bool = True,
        slice_config: dict | MiniCPMVSliceConfig | None = None,
        vision_config: dict | SiglipVisionConfig | None = None,
        audio_config: dict | WhisperConfig | None = None,
        tts_config: dict | None = None,
        use_image_id: bool = True,
        vision_batch_size: int = 16,
        audio_pool_step: int = 2,
        audio_chunk_length: float = 1.0,
        stream_input: bool = False,
        init_vision: bool = True,
        init_audio: bool = True,
        init_tts: bool = True,
        version: str | float = "2.6",
        **kwargs,
    ):
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.use_image_id = use_image_id
        self.vision_batch_size = vision_batch_size
        self.audio_pool_step = audio_pool_step
        self.audio_chunk_length = audio_chunk_length
        self.stream_input = stream_input
        self.init_vision = init_vision
        self.init_audio = init_audio
        self.init_tts = init_tts
        self.version = version

        if isinstance(slice_config, dict) or slice_config is None:
            slice_config = MiniCPMVSliceConfig(**(slice_config or {"max_slice_nums": 1}))
        self.slice_config = slice_config
        self.slice_mode = True

        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = SiglipVisionConfig(**(vision_config or {
                "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}))
        self.vision_config = vision_config
        self.patch_size = self.vision_config.patch_size

        if isinstance(audio_config, dict) or audio_config is None:
            audio_config = WhisperConfig(**(audio_config or {}))
        self.audio_config = audio_config

        # The speech decoder (ChatTTS) is not served by vLLM; its settings ride along untouched.
        self.tts_config = dict(tts_config or {})
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "audio_config", "slice_config"):
            value = getattr(self, key)
            if hasattr(value, "to_dict"):
                out[key] = value.to_dict()
        return out
