"""The UNet's configuration: :class:`UNetConfig` (diffusers' ``unet/config.json`` fields, checked), the variant
factory :func:`unet_config` and the attention-layer order :func:`attention_layer_names`.

The modules live in :mod:`dynamicid_jax.models.unet`, which re-exports these names (import them from either).
"""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["NUM_TIME_IDS", "UNetConfig", "unet_config", "attention_layer_names"]

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


def attention_layer_names(config: UNetConfig) -> list[str]:
    """Attention layers in diffusers' ``unet.attn_processors`` order: registration order, i.e. down blocks, then
    up blocks, then the mid block (``mid_block`` is assigned after the two empty ModuleLists), attn1 before
    attn2."""
    names = []

    def block(prefix, n_attn, n_layers):
        for j in range(n_attn):
            for t in range(n_layers):
                base = f"{prefix}.attentions.{j}.transformer_blocks.{t}"
                names.extend([f"{base}.attn1", f"{base}.attn2"])

    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            block(f"down_blocks.{i}", config.layers_per_block, config.transformer_layers[i])
    rev_layers = list(reversed(config.transformer_layers))
    for i, kind in enumerate(config.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            block(f"up_blocks.{i}", config.layers_per_block + 1, rev_layers[i])
    block("mid_block", 1, config.transformer_layers[-1])
    return names
