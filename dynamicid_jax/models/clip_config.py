"""CLIP's configurations: :class:`CLIPTextConfig` and :class:`CLIPVisionConfig` (transformers' ``config.json``
fields, checked: unknown keys are refused, bookkeeping keys ignored) and the variant factories
:func:`text_config` / :func:`vision_config`.

The towers live in :mod:`dynamicid_jax.models.clip`, which re-exports these names (import them from either).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dynamicid_jax.models.layers import activation

__all__ = ["CLIPTextConfig", "CLIPVisionConfig", "text_config", "vision_config"]


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
