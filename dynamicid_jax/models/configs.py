"""The models' configurations, each read from and written to its folder's ``config.json`` and checked (unknown keys
are refused): :class:`UNetConfig` (diffusers' ``UNet2DConditionModel``), :class:`VAEConfig` (``AutoencoderKL``),
:class:`CLIPTextConfig` / :class:`CLIPVisionConfig` (transformers' CLIP towers), with the variant factories
:func:`unet_config`, :func:`vae_config`, :func:`text_config`, :func:`vision_config`.

The modules live in :mod:`~dynamicid_jax.models.unet`, :mod:`~dynamicid_jax.models.vae` and
:mod:`~dynamicid_jax.models.clip`, which re-export their config's names (import them from either).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dynamicid_jax.models.layers import activation

__all__ = ["NUM_TIME_IDS", "CLIPTextConfig", "CLIPVisionConfig", "UNetConfig", "VAEConfig", "text_config",
           "unet_config", "vae_config", "vae_scale_factor", "vision_config"]


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------
NUM_TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The hyper-parameters of a diffusers ``UNet2DConditionModel`` that SD1.x / SD2.x checkpoints use."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' historical naming: ``attention_head_dim`` holds the number of heads unless
    # ``num_attention_heads`` is given. We resolve both into ``heads_per_block``.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_out_scale_factor: float = 1.0
    # SDXL's added conditioning (``addition_embed_type="text_time"``): the pooled text embedding and the six
    # micro-conditioning ids (original size, crop top-left, target size), each id embedded sinusoidally with
    # ``addition_time_embed_dim`` channels, go through ``add_embedding`` and are added to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def text_time(self) -> bool:
        """True for SDXL-style UNets that take ``added_cond = {"text_embeds", "time_ids"}``."""
        return self.addition_embed_type == "text_time"

    @property
    def pooled_text_dim(self) -> int:
        """Width of ``added_cond["text_embeds"]`` (1280 for SDXL): the add-embedding input minus 6 time ids."""
        if not self.text_time:
            raise ValueError("this UNet has no added text/time conditioning (addition_embed_type is not 'text_time')")
        return self.projection_class_embeddings_input_dim - NUM_TIME_IDS * self.addition_time_embed_dim

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        if isinstance(heads, int):
            return (heads,) * len(self.down_block_types)
        return tuple(heads)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        t = self.transformer_layers_per_block
        return (t,) * len(self.down_block_types) if isinstance(t, int) else tuple(t)

    def validate(self) -> "UNetConfig":
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        for name in self.down_block_types:
            if name not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"UNet config: unsupported down block type {name!r}")
        for name in self.up_block_types:
            if name not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"UNet config: unsupported up block type {name!r}")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn",):
            raise ValueError(f"UNet config: unsupported mid block type {self.mid_block_type!r}")
        if len(self.heads_per_block) != n or len(self.transformer_layers) != n:
            raise ValueError("UNet config: attention heads / transformer layers must be one value or one per block")
        for c, h in zip(self.block_out_channels, self.heads_per_block):
            if c % h:
                raise ValueError(f"UNet config: {c} channels are not divisible by {h} heads")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type {self.addition_embed_type!r} is not supported "
                             f"(None or 'text_time' (SDXL))")
        if self.text_time:
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"UNet config: addition_embed_type='text_time' needs a positive integer "
                                     f"{name}, got {value!r}")
            if self.pooled_text_dim <= 0:
                raise ValueError(f"UNet config: projection_class_embeddings_input_dim "
                                 f"{self.projection_class_embeddings_input_dim} leaves no room for the pooled text "
                                 f"embedding after {NUM_TIME_IDS} × {self.addition_time_embed_dim} time-id channels")
        if self.act_fn != "silu":
            raise ValueError(f"UNet config: act_fn {self.act_fn!r} is not supported (SD uses 'silu')")
        return self

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = "config") -> "UNetConfig":
        """Build from a diffusers ``unet/config.json`` dict. Options that change the architecture in ways SD1.x/2.x
        checkpoints never use must keep their default values; anything else unknown is an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, bad = {}, []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _INERT_DEFAULTS:
                if value != _INERT_DEFAULTS[key] and not (value is None and _INERT_DEFAULTS[key] is None):
                    bad.append(f"{key}={value!r} (only {_INERT_DEFAULTS[key]!r} is supported)")
            else:
                bad.append(f"{key} (unknown option)")
        if bad:
            raise ValueError(f"{source}: unsupported UNet config entries: " + ", ".join(bad))
        return cls(**kwargs).validate()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"_class_name": "UNet2DConditionModel",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


# diffusers options whose non-default values change the architecture in ways we do not implement.
_INERT_DEFAULTS: dict[str, Any] = {
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None, "dropout": 0.0,
    "addition_embed_type_num_heads": 64,
}


def unet_config(variant: str = "sd15") -> UNetConfig:
    """Variant factory: ``"sd15"`` (859,520,964 params), ``"sdxl"`` (SDXL base 1.0), ``"tiny"`` / ``"tiny-sdxl"``
    (tests) or ``"synthface"`` (the SynthFace demo's base, trained from scratch by ``synthface/stage0.py``)."""
    if variant == "sd15":
        return UNetConfig().validate()
    if variant == "tiny":
        return UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                          norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2).validate()
    if variant == "synthface":
        # The SynthFace stage-0 UNet (synthface/stage0.py): 16×16×4 latents (64 px), text width 64. Cross-attention
        # at 8×8 and 4×4 (and the mid block) only: attention over the 256 tokens of the 16×16 level costs more CPU
        # time than the rest of the UNet together. The shipped base (train/configs/synthface_base.yaml) adds a
        # narrow first level for its 32×32 latents and keeps attention at 8×8 and 4×4.
        return UNetConfig(sample_size=16, block_out_channels=(64, 64, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          norm_num_groups=16, cross_attention_dim=64, attention_head_dim=4).validate()
    if variant == "sdxl":
        # stable-diffusion-xl-base-1.0's unet/config.json: 2,567,463,684 params.
        return UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                          cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816).validate()
    if variant == "tiny-sdxl":
        # SDXL's structure at test size: the same block types, transformer depths (1, 2, 3) and added embeddings.
        return UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), norm_num_groups=8,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
                          cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8).validate()
    raise ValueError(f"unknown UNet variant {variant!r}; expected 'sd15', 'sdxl', 'tiny', 'tiny-sdxl' or "
                     f"'synthface'")


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The hyper-parameters of a diffusers ``AutoencoderKL`` (the keys of its ``vae/config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Not architectural: how latents are scaled for the diffusion model, and hints for callers.
    sample_size: int | tuple[int, ...] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for SD)."""
        return 2 ** (self.num_levels - 1)

    def validate(self) -> "VAEConfig":
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VAE config: {name} must be a positive int, got {value!r}")

        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            positive_int(name, getattr(self, name))
        if not self.block_out_channels:
            raise ValueError("VAE config: block_out_channels must name at least one level")
        for c in self.block_out_channels:
            positive_int("block_out_channels[i]", c)
            if c % self.norm_num_groups:
                raise ValueError(f"VAE config: {c} channels (block_out_channels) are not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
        activation(self.act_fn)  # raises for an unknown name
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VAE config: {name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, (int, float)) \
                or self.scaling_factor <= 0:
            raise ValueError(f"VAE config: scaling_factor must be a positive number, got {self.scaling_factor!r}")
        if self.shift_factor is not None and (isinstance(self.shift_factor, bool)
                                              or not isinstance(self.shift_factor, (int, float))):
            raise ValueError(f"VAE config: shift_factor must be null or a number, got {self.shift_factor!r}")
        return self

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "VAE config") -> "VAEConfig":
        """Build from a diffusers ``vae/config.json`` dict.

        Metadata keys (``_class_name``, ``_diffusers_version``, ``_name_or_path`` … anything starting with ``_``)
        are ignored, but a ``_class_name`` other than ``AutoencoderKL`` is an error. Block types must be the
        plain ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` with one per level. Any other unknown key is an error
        naming it, since it may change the architecture."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"{source}: _class_name is {class_name!r}; this loader reads 'AutoencoderKL'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, bad = {}, []
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in ("down_block_types", "up_block_types"):
                want = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
                if not isinstance(value, (list, tuple)) or len(value) != n or any(v != want for v in value):
                    bad.append(f"{key}={value!r} (expected {n} × {want!r}, one per block_out_channels entry)")
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                bad.append(f"{key} (unknown option)")
        if bad:
            raise ValueError(f"{source}: unsupported AutoencoderKL config entries: " + ", ".join(bad))
        try:
            return cls(**kwargs).validate()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` form (``AutoencoderKL(**d)`` accepts it, less ``_class_name``)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["down_block_types"] = ["DownEncoderBlock2D"] * self.num_levels
        d["up_block_types"] = ["UpDecoderBlock2D"] * self.num_levels
        return {"_class_name": "AutoencoderKL", **dict(sorted(d.items()))}


def vae_scale_factor(config: VAEConfig) -> int:
    """Pixels per latent along each side (8 for SD1.5): :attr:`VAEConfig.downsample_factor`."""
    return config.downsample_factor


def vae_config(variant: str = "sd15") -> VAEConfig:
    """Variant factory: ``"sd15"`` (83,653,863 params), ``"tiny"`` (tests: 2 levels, every module kind) or
    ``"synthface"`` (the SynthFace demo's base, trained from scratch by ``synthface/stage0.py``)."""
    if variant == "sd15":
        return VAEConfig().validate()
    if variant == "tiny":
        return VAEConfig(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                         sample_size=32).validate()
    if variant == "synthface":
        # The SynthFace stage-0 VAE (synthface/stage0.py): 3 levels → scale factor 4 (64 px ↔ 16×16×4 latents);
        # narrow at full resolution because CPU time goes there; 4 channels per GroupNorm group; no mid-block
        # attention (it trains on crops). The shipped base overrides the levels to (32, 64): scale factor 2
        # (train/configs/synthface_base.yaml). ``scaling_factor`` is a placeholder: stage 0 sets it to 1/std of
        # the trained VAE's latents.
        return VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=4,
                         mid_block_add_attention=False, sample_size=64, scaling_factor=1.0).validate()
    raise ValueError(f"unknown VAE variant {variant!r}; expected 'sd15', 'tiny' or 'synthface'")


# ---------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------
# PretrainedConfig bookkeeping and generation settings: present in real config.json files, no effect on a
# CLIP forward pass (dropout is inactive at inference; initialisers do not matter for loaded weights).
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "attention_dropout", "dropout",
    "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "return_dict", "output_hidden_states",
    "output_attentions", "use_return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "gradient_checkpointing",
    "use_cache", "output_past", "xla_device", "is_composition", "logit_scale_init_value",
})
_TOP_LEVEL_KEYS = frozenset({"text_config", "vision_config", "text_config_dict", "vision_config_dict",
                             "projection_dim"})


def _check_keys(cls, d: Mapping[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)} | _IGNORED_KEYS
    unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown} for a {cls.__name__}; this implementation "
                         f"understands {sorted(f.name for f in dataclasses.fields(cls))} (plus transformers' "
                         f"bookkeeping keys) and cannot tell whether the unknown ones change the model")


def _square(value: Any, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{source}: {name}={value!r} is not square; only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text tower; field names are those of transformers' ``CLIPTextConfig``."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 768  # kept for completeness; CLIPTextModel has no projection

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        activation(self.hidden_act)  # raises for an unknown name

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPTextConfig":
        """From a ``CLIPTextConfig`` dict, or the ``text_config`` of a full ``CLIPModel`` config."""
        d = _sub_config(d, "text", source)
        _check_keys(cls, d, source)
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"{source}: eos_token_id={eos!r}; CLIP pooling needs a single EOS id")
            kwargs["eos_token_id"] = eos[0]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` form of a ``CLIPTextModel``."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}

    def to_dict_with_projection(self) -> dict[str, Any]:
        """The ``config.json`` form of a ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``)."""
        return {**self.to_dict(), "architectures": ["CLIPTextModelWithProjection"]}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower + projection (transformers' ``CLIPVisionConfig``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        activation(self.hidden_act)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPVisionConfig":
        """From a ``CLIPVisionConfig`` dict, or the ``vision_config`` of a full ``CLIPModel`` config."""
        d = _sub_config(d, "vision", source)
        _check_keys(cls, d, source)
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        for name in ("image_size", "patch_size"):
            if name in kwargs:
                kwargs[name] = _square(kwargs[name], name, source)
        return cls(**kwargs)


_MODEL_TYPES = {"text": "clip_text_model", "vision": "clip_vision_model"}


def _sub_config(d: Mapping[str, Any], which: str, source: str) -> dict:
    """The ``which`` tower's flat config from either a tower config or a full ``CLIPModel`` config."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type == "clip" or any(k in d for k in _TOP_LEVEL_KEYS - {"projection_dim"}):
        unknown = sorted(k for k in d if k not in _TOP_LEVEL_KEYS | _IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in a full CLIPModel config (expected "
                             f"{sorted(_TOP_LEVEL_KEYS)} and transformers' bookkeeping keys)")
        sub = dict(d.get(f"{which}_config") or {})
        sub.update(d.get(f"{which}_config_dict") or {})  # legacy *_config_dict wins, as in transformers
        if which == "vision" and d.get("projection_dim") is not None:
            sub["projection_dim"] = d["projection_dim"]  # CLIPModel's visual_projection uses the top-level one
        d, source = sub, f"{source} [{which}_config]"
        model_type = d.get("model_type")
    if model_type is not None and model_type != _MODEL_TYPES[which]:
        raise ValueError(f"{source}: model_type {model_type!r} is not a CLIP {which} config (expected "
                         f"{_MODEL_TYPES[which]!r} or a full 'clip' config)")
    return dict(d)


def text_config(variant: str = "sd15") -> CLIPTextConfig:
    """``"sd15"``: CLIP ViT-L/14 text (SD1.x, also SDXL's first encoder); ``"openclip-h"``: OpenCLIP ViT-H/14 text
    (SD2.x); ``"openclip-bigg"``: OpenCLIP ViT-bigG/14 text (SDXL's second encoder, with projection); ``"tiny"``;
    ``"synthface"``: the SynthFace base's (SD1.5 vocabulary and EOS, 77 positions, hidden size 64).

    ``"sd15"`` uses ``eos_token_id=49407``; SD1.5's own config.json says 2 (argmax pooling), which picks the same
    position for tokenizer output, since 49407 is the largest id.
    """
    variants = {
        "sd15": CLIPTextConfig(),
        "openclip-h": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                     num_attention_heads=16, hidden_act="gelu", projection_dim=512),
        "openclip-bigg": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                        eos_token_id=2),  # as SDXL's text_encoder_2/config.json (argmax pooling)
        "tiny": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, eos_token_id=999, projection_dim=64),
        # The SynthFace base (synthface/stage0.py): SD1.5's vocabulary / tokenizer, 77 positions, 64 wide.
        "synthface": CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    projection_dim=64),
    }
    if variant not in variants:
        raise ValueError(f"unknown CLIP text variant {variant!r}; expected one of {sorted(variants)}")
    return variants[variant]


def vision_config(variant: str = "clip-h") -> CLIPVisionConfig:
    """``"clip-h"``: ViT-H/14 (laion2B), 224 px, 1280 wide, projection 1024; ``"clip-l"``: ViT-L/14; ``"tiny"``."""
    variants = {
        "clip-h": CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=16, patch_size=14, hidden_act="gelu", projection_dim=1024),
        "clip-l": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, patch_size=14, projection_dim=768),
        "tiny": CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=32, patch_size=4, projection_dim=48),
    }
    if variant not in variants:
        raise ValueError(f"unknown CLIP vision variant {variant!r}; expected one of {sorted(variants)}")
    return variants[variant]
