"""Text-to-image SDXL: the second backbone, built from the same modules as Stable Diffusion 1.5.

    sdxl = StableDiffusionXL.from_pretrained("path/to/stable-diffusion-xl-base-1.0")   # diffusers folder
    sdxl = StableDiffusionXL.from_pretrained("sd_xl_base_1.0.safetensors")             # single-file checkpoint
    images = sdxl.generate(["a photo of a cat"], steps=30, guidance_scale=5.0, seed=0)   # uint8 [B, H, W, 3]

What differs from SD1.5 is configuration of the same classes: the UNet (:class:`UNet2DConditionModel` with
per-block transformer depths, linear projections and the ``text_time`` added embedding), two text encoders
(CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection: their penultimate hidden states are concatenated to
the 2048-wide context, the projected pooled output of the second is the pooled text embedding), SDXL's VAE
(scaling factor 0.13025) and the six micro-conditioning ids (original size, crop top-left, target size).

As in :class:`~dynamicid_jax.pipelines.stable_diffusion.StableDiffusion`, the whole of ``generate`` — both text
encoders, the denoising loop, VAE decode — is one XLA program per (batch, height, width, steps, guidance mode);
the guidance scale and the micro-conditioning ids are traced values.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.models.layers import AttentionStrategy
from dynamicid_jax.models.clip import CLIPTextModel
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import AutoencoderKL, decode_latents, vae_scale_factor
from dynamicid_jax.pipelines.sampling import denoise, to_uint8
from dynamicid_jax.pipelines.stable_diffusion import TextConditioning
from dynamicid_jax.tokenizer import tokenize
from dynamicid_jax.weights.keymap import is_sdxl  # noqa: F401  (the backbone test, re-exported here)

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def tokenizer_2_ids(ids: jax.Array, eos_id: int = 49407, pad_id: int = 0) -> jax.Array:
    """``tokenizer_2``'s ids from ``tokenizer``'s: SDXL's two tokenizers share the BPE and differ only in padding
    (EOS vs ``"!"``, id 0). The padding is the trailing run of EOS after the closing EOS, so every position after
    the first EOS of that run becomes ``pad_id`` (a literal ``<|endoftext|>`` inside a prompt stays). Lets training
    data carry one tokenization (``input_ids``) for both encoders. Exact for prompts without ``"!"``: tokenizer 2
    treats ``"!"``, its pad token, as a special token wherever it appears, so such prompts tokenize differently
    (give the data ``input_ids_2`` for them)."""
    ids = jnp.asarray(ids)
    length = ids.shape[-1]
    not_eos = ids != eos_id
    last_text = length - 1 - jnp.argmax(not_eos[:, ::-1], axis=-1)  # last non-EOS position (BOS at least)
    after = jnp.arange(length)[None, :] > (last_text + 1)[:, None]
    return jnp.where(after, jnp.asarray(pad_id, ids.dtype), ids)


def encode_sdxl_text(text_encoder, text_encoder_2, params: dict, ids: jax.Array,
                     ids_2: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """SDXL's prompt encoding (traceable): ``(context [B, L, D1 + D2], pooled [B, P])`` — the penultimate hidden
    states of both encoders concatenated, and the second encoder's projected pooled output. ``params`` holds
    ``"text_encoder"`` and ``"text_encoder_2"``; ``ids_2`` defaults to :func:`tokenizer_2_ids` of ``ids``."""
    ids_2 = tokenizer_2_ids(ids) if ids_2 is None else ids_2
    out = text_encoder.apply({"params": params["text_encoder"]}, ids, output_hidden_states=True)
    out_2 = text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2, output_hidden_states=True)
    context = jnp.concatenate([out.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
    return context, out_2.text_embeds


@dataclasses.dataclass(frozen=True)
class SDXLSamplerKey:
    batch: int
    height: int
    width: int
    steps: int
    guided: bool
    zero_negative: bool  # the unconditional embeddings are zeros (no negative prompt, force_zeros_for_empty_prompt)


@dataclasses.dataclass
class StableDiffusionXL:
    """The SDXL components (Flax modules + params), two tokenizers and a scheduler."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel  # a CLIPTextModelWithProjection
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any
    params: dict  # {"unet", "vae", "text_encoder", "text_encoder_2"}
    # SDXL's model_index.json: with no negative prompt the unconditional branch sees zero embeddings, not "".
    force_zeros_for_empty_prompt: bool = True
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    last_timings: dict = dataclasses.field(default_factory=dict, repr=False)

    #: the backbone's name in messages and weight folders; the default image side in pixels
    backbone: ClassVar[str] = "SDXL"
    default_size: ClassVar[int] = 1024

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                        scheduler: str | None = "euler", dtype=jnp.float32, strategy: AttentionStrategy | None = None,
                        variant: str | None = None, vae: str | os.PathLike | None = None) -> "StableDiffusionXL":
        """Load a local diffusers SDXL folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
        ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``) or a single-file SDXL ``.safetensors`` checkpoint.

        ``config``: for single files only, a diffusers SDXL folder whose configs (and tokenizers / scheduler)
        describe the file; default: SDXL base 1.0's configs and the offline tokenizers. ``scheduler``: ``"euler"``
        (default, SDXL's own), ``"ddim"``, ``"dpm++2m"`` or ``None`` (the class the config names). ``dtype`` is the
        compute dtype (params stay fp32). ``vae``: a diffusers ``AutoencoderKL`` folder replacing the model's VAE
        (e.g. an fp16-safe SDXL VAE). In float16, a VAE whose config says ``force_upcast`` decodes in float32, as
        diffusers does (SDXL's original VAE overflows in fp16)."""
        from dynamicid_jax.models.clip import load_text_encoder
        from dynamicid_jax.models.unet import load_unet
        from dynamicid_jax.schedulers import load_scheduler
        from dynamicid_jax.tokenizer import load_tokenizer
        from dynamicid_jax.weights import keymap as km

        path = os.fspath(path)
        if km.is_single_file(path, config):
            return cls._from_single_file(path, config, scheduler, dtype, strategy, vae)
        km.check_pipeline_folder(path, SDXL_COMPONENTS, "SDXL")
        unet, unet_params = load_unet(path, dtype=dtype, strategy=strategy, variant=variant)
        vae_module, vae_params = _load_vae(vae if vae is not None else os.path.join(path, "vae"), dtype, variant)
        text_encoder, text_params = load_text_encoder(os.path.join(path, "text_encoder"), dtype=dtype,
                                                      variant=variant)
        text_encoder_2, text_2_params = load_text_encoder(os.path.join(path, "text_encoder_2"), dtype=dtype,
                                                          variant=variant)
        if not text_encoder_2.projects:
            raise ValueError(f"{path}/text_encoder_2 is not a CLIPTextModelWithProjection (its config.json "
                             f"'architectures' must say so): SDXL's pooled text embedding is its projection")
        return cls(unet, vae_module, text_encoder, text_encoder_2,
                   load_tokenizer(os.path.join(path, "tokenizer")), load_tokenizer(os.path.join(path, "tokenizer_2")),
                   load_scheduler(os.path.join(path, "scheduler"), kind=scheduler),
                   {"unet": unet_params, "vae": vae_params, "text_encoder": text_params,
                    "text_encoder_2": text_2_params},
                   force_zeros_for_empty_prompt=_force_zeros(path))

    @classmethod
    def _from_single_file(cls, path, config, scheduler, dtype, strategy, vae) -> "StableDiffusionXL":
        from dynamicid_jax.models.clip import text_encoder_from_state_dict
        from dynamicid_jax.models.unet import UNetConfig, unet_from_state_dict
        from dynamicid_jax.models.vae import vae_from_state_dict
        from dynamicid_jax.schedulers import load_scheduler
        from dynamicid_jax.tokenizer import SDXL_PAD_TOKEN, load_tokenizer
        from dynamicid_jax.weights import keymap as km
        from dynamicid_jax.weights import single_file_sdxl as sfx

        configs = km.override_configs(sfx.sdxl_configs(), config, ("unet", "vae", "text_encoder", "text_encoder_2"),
                                      "a diffusers SDXL folder with unet/, vae/, ... configs")
        config = None if config is None else os.fspath(config)
        state = sfx.load_sdxl_single_file_components(path, configs["unet"], configs["vae"])
        for part in ("unet", "text_encoder", "text_encoder_2"):
            if not state[part]:
                raise FileNotFoundError(f"{path} holds no {part} weights; an SDXL single file needs all of "
                                        f"model.diffusion_model.*, conditioner.embedders.0.* and .1.*")
        unet, unet_params = unet_from_state_dict(state["unet"], UNetConfig.from_dict(configs["unet"], source=path),
                                                 dtype=dtype, strategy=strategy, source=path)
        if vae is not None:
            vae_module, vae_params = _load_vae(vae, dtype, None)
        elif state["vae"]:
            vae_module, vae_params = vae_from_state_dict(state["vae"], configs["vae"], dtype=_vae_dtype(
                dtype, configs["vae"].get("force_upcast", True)), source=path)
        else:
            raise FileNotFoundError(f"{path} holds no VAE weights: pass vae= a diffusers AutoencoderKL folder")
        text_encoder, text_params = text_encoder_from_state_dict(
            state["text_encoder"], configs["text_encoder"], dtype=dtype, source=path, with_projection=False)
        text_encoder_2, text_2_params = text_encoder_from_state_dict(
            state["text_encoder_2"], configs["text_encoder_2"], dtype=dtype, source=path, with_projection=True)

        def tokenizer(part, pad):
            folder = os.path.join(config, part) if config is not None else None
            return load_tokenizer(folder if folder and os.path.isdir(folder) else None, pad_token=pad)

        from dynamicid_jax.tokenizer import EOS_TOKEN

        return cls(unet, vae_module, text_encoder, text_encoder_2, tokenizer("tokenizer", EOS_TOKEN),
                   tokenizer("tokenizer_2", SDXL_PAD_TOKEN), load_scheduler(configs["scheduler"], kind=scheduler),
                   {"unet": unet_params, "vae": vae_params, "text_encoder": text_params,
                    "text_encoder_2": text_2_params},
                   force_zeros_for_empty_prompt=_force_zeros(config) if config is not None else True)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SDXL)."""
        return vae_scale_factor(self.vae.config)

    def size_multiple(self) -> int:
        """Generated heights and widths must be multiples of this (VAE factor × UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------------ encoding
    def _encode(self, params, ids, ids_2):
        """Traced: ``(context [B, 77, D1 + D2], pooled [B, P])`` from the two tokenizations."""
        return encode_sdxl_text(self.text_encoder, self.text_encoder_2, params, ids, ids_2)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """``(context [B, 77, 2048], pooled [B, 1280])`` for a list of prompts (SDXL's ``encode_prompt``)."""
        prompts = list(prompts)
        ids, ids_2 = tokenize(self.tokenizer, prompts), tokenize(self.tokenizer_2, prompts)
        return jax.jit(self._encode)(self.params, jnp.asarray(ids), jnp.asarray(ids_2))

    # --------------------------------------------------------------------- text conditioning (every pipeline)
    # The same members as StableDiffusion's: identity pipelines get SDXL's context, pooled text and
    # micro-conditioning through them without knowing the backbone.
    @property
    def text_encoders(self) -> tuple:
        """The text-encoder modules (part of what identifies a compiled program)."""
        return (self.text_encoder, self.text_encoder_2)

    def text_inputs(self, prompts: Sequence[str], negatives: Sequence[str], *, negative_given: bool,
                    height: int, width: int, micro_conditioning: Mapping[str, Any] | None = None) -> tuple[dict, Any]:
        """Host side, before compiling: ``(inputs, zero_negative)`` — both tokenizations of the prompts and
        negatives and the ``time_ids [B, 6]`` (``micro_conditioning``: ``original_size``, ``crops_coords_top_left``,
        ``target_size``; defaults ``(height, width)``, ``(0, 0)``, ``(height, width)``; the unconditional rows get
        the same ids), and whether the unconditional embeddings are zeros (no negative prompt and the model's
        ``force_zeros_for_empty_prompt``), which the program depends on."""
        micro = dict(micro_conditioning or {})
        unknown = sorted(set(micro) - {"original_size", "crops_coords_top_left", "target_size"})
        if unknown:
            raise ValueError(f"unknown SDXL micro-conditioning {unknown}; expected original_size, "
                             f"crops_coords_top_left, target_size")
        time_ids = np.asarray([*_pair(micro.get("original_size"), (height, width), "original_size"),
                               *_pair(micro.get("crops_coords_top_left"), (0, 0), "crops_coords_top_left"),
                               *_pair(micro.get("target_size"), (height, width), "target_size")], np.float32)
        prompts, negatives = list(prompts), list(negatives)
        inputs = {"ids": tokenize(self.tokenizer, prompts), "ids_2": tokenize(self.tokenizer_2, prompts),
                  "negative_ids": tokenize(self.tokenizer, negatives),
                  "negative_ids_2": tokenize(self.tokenizer_2, negatives),
                  "time_ids": np.broadcast_to(time_ids, (len(prompts), 6))}
        return ({k: jnp.asarray(v) for k, v in inputs.items()},
                not negative_given and self.force_zeros_for_empty_prompt)

    def text_conditioning(self, params: Mapping, inputs: Mapping, *, guided: bool, mode: Any = False
                          ) -> TextConditioning:
        """Traced: the 2048-wide context of both encoders, and the pooled text + micro-conditioning as the UNet's
        added conditioning, for the prompts and (when ``guided``) the negatives — zeros when ``mode``
        (``zero_negative``) is set."""
        context, pooled = self._encode(params, inputs["ids"], inputs["ids_2"])
        added = {"text_embeds": pooled, "time_ids": inputs["time_ids"]}
        if not guided:
            return TextConditioning(context, None, added, None)
        if mode:
            uncond_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
        else:
            uncond_context, neg_pooled = self._encode(params, inputs["negative_ids"], inputs["negative_ids_2"])
        return TextConditioning(context, uncond_context, added,
                                {"text_embeds": neg_pooled, "time_ids": inputs["time_ids"]})

    @property
    def pooled_text_dim(self) -> int:
        """Width of :meth:`pooled_text` (what DynamicID's IMR reads): the second encoder's projection (1280)."""
        return self.text_encoder_2.config.projection_dim

    def pooled_text_ids(self, texts: Sequence[str]) -> jax.Array:
        """Host side: the token ids :meth:`pooled_text` reads (``tokenizer_2``'s)."""
        return jnp.asarray(tokenize(self.tokenizer_2, list(texts)))

    def pooled_text(self, params: Mapping, ids: jax.Array) -> jax.Array:
        """Traced: SDXL's pooled text embedding ``[B, 1280]`` (the second encoder's projected pooled output)."""
        return self.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids).text_embeds

    # ------------------------------------------------------------------------------------------------ sampling
    def _sample_fn(self, key: SDXLSamplerKey, output_type: str):
        def run(params, text_inputs, noise, guidance_scale):
            text = self.text_conditioning(params, text_inputs, guided=key.guided, mode=key.zero_negative)
            latents = denoise(self.unet, params["unet"], self.scheduler, key.steps, noise, text.context,
                              guidance_scale, uncond_context=text.uncond_context, added_cond=text.added,
                              uncond_added_cond=text.uncond_added)
            images = decode_latents(self.vae, params["vae"], latents)
            return to_uint8(images) if output_type == "uint8" else (images.astype(jnp.float32) + 1.0) / 2.0

        return jax.jit(run)

    def generate(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int = 1024, width: int = 1024, steps: int = 30, guidance_scale: float = 5.0, seed: int = 0,
                 latents: np.ndarray | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 output_type: str = "uint8") -> np.ndarray:
        """Text-to-image: ``uint8 [B, height, width, 3]`` (``output_type="float"``: ``[0, 1]`` float32, as
        diffusers' ``output_type="np"``); deterministic for a given ``seed``.

        Micro-conditioning (SDXL's size and crop conditioning, ``(height, width)`` / ``(top, left)`` in pixels):
        ``original_size`` and ``target_size`` default to ``(height, width)``, ``crops_coords_top_left`` to
        ``(0, 0)``; the unconditional branch gets the same ids (as diffusers by default). Guidance is on when
        ``guidance_scale > 1``; without ``negative_prompt`` the unconditional embeddings are zeros when the
        model's ``force_zeros_for_empty_prompt`` is set (SDXL base), else those of ``""``."""
        from dynamicid_jax.pipelines.stable_diffusion import check_text_request, start_noise

        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
        prompts, negatives, guidance_scale = check_text_request(self, prompts, negative_prompt, height, width, steps,
                                                                guidance_scale)
        noise = start_noise(self, len(prompts), height, width, seed, latents)
        text_inputs, zero_negative = self.text_inputs(
            prompts, negatives, negative_given=negative_prompt is not None, height=height, width=width,
            micro_conditioning={"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                                "target_size": target_size})
        guided = guidance_scale > 1.0
        key = SDXLSamplerKey(len(prompts), height, width, steps, guided, guided and zero_negative)
        args = (self.params, text_inputs, noise, jnp.float32(guidance_scale))
        timings, compiled_key = {}, (key, output_type)
        if compiled_key not in self._compiled:
            start = time.perf_counter()
            self._compiled[compiled_key] = self._sample_fn(key, output_type).lower(*args).compile()
            timings["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        images = np.asarray(jax.block_until_ready(self._compiled[compiled_key](*args)))
        timings["run_s"] = time.perf_counter() - start
        self.last_timings = timings
        return images

    @property
    def num_compiled(self) -> int:
        """How many sampler programs have been compiled."""
        return len(self._compiled)


def _pair(value, default: tuple[int, int], name: str) -> tuple[int, int]:
    value = default if value is None else tuple(value)
    if len(value) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in value):
        raise ValueError(f"{name} must be two non-negative integers (height, width) / (top, left), got {value!r}")
    return int(value[0]), int(value[1])


def _vae_dtype(dtype, force_upcast: bool):
    """fp32 for a ``force_upcast`` VAE when the pipeline computes in fp16 (diffusers upcasts SDXL's VAE)."""
    return jnp.float32 if force_upcast and jnp.dtype(dtype) == jnp.float16 else dtype


def _load_vae(folder, dtype, variant):
    from dynamicid_jax.models.vae import load_vae
    from dynamicid_jax.weights import keymap as km

    found = km.find_component(folder, "vae", what="VAE")
    force_upcast = bool(km.read_config(found).get("force_upcast", True))
    return load_vae(found, dtype=_vae_dtype(dtype, force_upcast), variant=variant)


def _force_zeros(folder: str) -> bool:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return True
    with open(index, encoding="utf-8") as f:
        try:
            return bool(json.load(f).get("force_zeros_for_empty_prompt", True))
        except (json.JSONDecodeError, AttributeError):
            return True
