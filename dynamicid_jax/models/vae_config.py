"""The VAE's configuration: :class:`VAEConfig` (diffusers' ``vae/config.json`` fields, checked), the variant
factory :func:`vae_config` and :func:`vae_scale_factor`.

The modules live in :mod:`dynamicid_jax.models.vae`, which re-exports these names (import them from either).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dynamicid_jax.models import layers

__all__ = ["VAEConfig", "vae_config", "vae_scale_factor"]


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
        layers.activation(self.act_fn)  # raises for an unknown name
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
    """Pixels per latent along each side: the encoder halves the resolution between levels (8 for SD1.5)."""
    return 2 ** (len(config.block_out_channels) - 1)


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
