"""Text-to-image Stable Diffusion: loading a whole model and sampling in one jitted function.

    sd = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")      # diffusers folder
    sd = StableDiffusion.from_pretrained("realisticVisionV60B1.safetensors")   # single-file LDM checkpoint
    images = sd.generate(["a photo of a cat"], steps=50, guidance_scale=7.5, seed=0)   # uint8 [B, H, W, 3]

The whole of ``generate`` — text encoding, the denoising loop, VAE decode — is one XLA program, compiled once per
(batch, height, width, steps, guidance on/off) and reused; the guidance scale is a traced value.
"""
from __future__ import annotations

import dataclasses
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
from dynamicid_jax.pipelines.sampling import (check_number, check_prompts, check_request_size, denoise_steps,
                                              initial_carry, run_in_chunks, to_uint8)
from dynamicid_jax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """What a backbone's text gives the UNet, as traced values (see :meth:`StableDiffusion.text_conditioning`):
    ``context [B, 77, D]`` of the prompts, ``uncond_context`` of the guidance's negative rows (``None`` without
    guidance), and the added conditioning of each (``None`` on SD1.x; SDXL: ``{"text_embeds", "time_ids"}``).
    Identity methods append their tokens to the contexts and pass the rest to the UNet unchanged."""

    context: jax.Array
    uncond_context: jax.Array | None = None
    added: Any = None
    uncond_added: Any = None


@dataclasses.dataclass(frozen=True)
class SamplerKey:
    batch: int
    height: int
    width: int
    steps: int
    guided: bool


@dataclasses.dataclass
class StableDiffusion:
    """The SD components (Flax modules + params), a tokenizer and a scheduler."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler: Any
    params: dict  # {"unet": ..., "vae": ..., "text_encoder": ...}
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    last_timings: dict = dataclasses.field(default_factory=dict, repr=False)

    #: the backbone's name in messages and weight folders; the default image side in pixels
    backbone: ClassVar[str] = "SD1.x"
    default_size: ClassVar[int] = 512

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                        scheduler: str | None = "ddim", dtype=jnp.float32,
                        strategy: AttentionStrategy | None = None, variant: str | None = None) -> "StableDiffusion":
        """Load a local diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``) or a single-file ``.safetensors`` LDM checkpoint.

        ``config``: for single files only, a diffusers folder whose component configs (and tokenizer /
        scheduler) describe the checkpoint; default: the built-in SD1.5 configs and the offline tokenizer.
        ``scheduler``: ``"ddim"`` (default), ``"dpm++2m"``, ``"euler"`` — built from the model's
        ``scheduler_config.json`` (betas, timesteps); ``None`` uses the class that file names, which must be one
        of ours. ``dtype`` is the compute dtype (params stay fp32); ``strategy`` goes to every UNet attention.
        """
        from dynamicid_jax.models.clip import load_text_encoder
        from dynamicid_jax.models.unet import load_unet
        from dynamicid_jax.models.vae import load_vae
        from dynamicid_jax.schedulers import load_scheduler
        from dynamicid_jax.tokenizer import load_tokenizer
        from dynamicid_jax.weights import keymap as km

        path = os.fspath(path)
        if km.is_single_file(path, config):
            return cls._from_single_file(path, config, scheduler, dtype, strategy)
        km.check_pipeline_folder(path, ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), "Stable Diffusion")
        unet, unet_params = load_unet(path, dtype=dtype, strategy=strategy, variant=variant)
        vae, vae_params = load_vae(path, dtype=dtype, variant=variant)
        text_encoder, text_params = load_text_encoder(os.path.join(path, "text_encoder"), dtype=dtype,
                                                      variant=variant)
        return cls(unet, vae, text_encoder, load_tokenizer(os.path.join(path, "tokenizer")),
                   load_scheduler(os.path.join(path, "scheduler"), kind=scheduler),
                   {"unet": unet_params, "vae": vae_params, "text_encoder": text_params})

    @classmethod
    def _from_single_file(cls, path, config, scheduler, dtype, strategy) -> "StableDiffusion":
        from dynamicid_jax.models.clip import text_encoder_from_state_dict
        from dynamicid_jax.models.unet import UNetConfig, unet_from_state_dict
        from dynamicid_jax.models.vae import load_vae, vae_from_state_dict
        from dynamicid_jax.schedulers import load_scheduler
        from dynamicid_jax.tokenizer import load_tokenizer
        from dynamicid_jax.weights import keymap as km
        from dynamicid_jax.weights import single_file as sf

        configs = km.override_configs(sf.sd15_configs(), config, ("unet", "vae", "text_encoder"),
                                      "a diffusers folder with unet/, vae/, ... configs")
        config = None if config is None else os.fspath(config)
        state = sf.load_single_file_components(path, configs["unet"], configs["vae"])
        unet, unet_params = unet_from_state_dict(state["unet"], UNetConfig.from_dict(configs["unet"], source=path),
                                                 dtype=dtype, strategy=strategy, source=path)
        if state["vae"]:
            vae, vae_params = vae_from_state_dict(state["vae"], configs["vae"], dtype=dtype, source=path)
        elif config is not None and os.path.isdir(os.path.join(config, "vae")):
            vae, vae_params = load_vae(os.path.join(config, "vae"), dtype=dtype)
        else:
            raise FileNotFoundError(f"{path} holds no VAE weights (a 'noVAE' release): pass config= a diffusers "
                                    f"folder whose vae/ holds the VAE to use")
        if not state["text_encoder"]:
            raise FileNotFoundError(f"{path} holds no text-encoder weights (cond_stage_model.transformer.*)")
        text_encoder, text_params = text_encoder_from_state_dict(state["text_encoder"], configs["text_encoder"],
                                                                 dtype=dtype, source=path)
        has_tokenizer = config is not None and os.path.isdir(os.path.join(config, "tokenizer"))
        tokenizer = load_tokenizer(os.path.join(config, "tokenizer") if has_tokenizer else None)
        return cls(unet, vae, text_encoder, tokenizer, load_scheduler(configs["scheduler"], kind=scheduler),
                   {"unet": unet_params, "vae": vae_params, "text_encoder": text_params})

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: str = "float32") -> str:
        """Write a diffusers folder (the interchange format: diffusers' own pipeline loads it too).

        ``dtype``: ``"float32"`` or ``"float16"`` for the stored floating-point weights (our loader widens fp16
        back to fp32). The folder appears complete or not at all: everything is written to a temporary sibling,
        then renamed."""
        import json

        from dynamicid_jax.models.clip import TEXT_KEYMAP
        from dynamicid_jax.models.unet import UNET_KEYMAP
        from dynamicid_jax.models.vae import VAE_KEYMAP
        from dynamicid_jax.weights.keymap import export_state_dict, write_safetensors

        from dynamicid_jax.file_io import atomic_folder

        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        folder = os.path.abspath(os.fspath(folder))
        if os.path.exists(folder):
            raise FileExistsError(f"{folder} already exists; choose a new folder")
        with atomic_folder(folder) as tmp:
            parts = {
                "unet": (self.unet.config.to_dict(), export_state_dict(self.params["unet"], UNET_KEYMAP),
                         "diffusion_pytorch_model"),
                "vae": (self.vae.config.to_dict(), export_state_dict(self.params["vae"], VAE_KEYMAP),
                        "diffusion_pytorch_model"),
                "text_encoder": (self.text_encoder.config.to_dict(),
                                 export_state_dict(self.params["text_encoder"], TEXT_KEYMAP), "model"),
            }
            for name, (config, state, stem) in parts.items():
                if dtype == "float16":
                    state = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in state.items()}
                os.makedirs(os.path.join(tmp, name))
                with open(os.path.join(tmp, name, "config.json"), "w") as f:
                    json.dump(config, f, indent=2)
                write_safetensors(state, os.path.join(tmp, name, f"{stem}.safetensors"),
                                  metadata={"format": "pt"})
            self.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            scheduler_class = type(self.scheduler).__name__
            os.makedirs(os.path.join(tmp, "scheduler"))
            with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
                json.dump({"_class_name": scheduler_class, **self.scheduler.config.to_dict()}, f, indent=2)
            with open(os.path.join(tmp, "model_index.json"), "w") as f:
                json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                           "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                           "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler_class],
                           "safety_checker": [None, None], "feature_extractor": [None, None],
                           "requires_safety_checker": False}, f, indent=2)
        return folder

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side: ``2 ** (VAE levels − 1)`` (8 for SD1.5)."""
        return vae_scale_factor(self.vae.config)

    def size_multiple(self) -> int:
        """Generated heights and widths must be multiples of this (VAE factor × UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------------ sampling
    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """CLIP last hidden states ``[B, 77, D]`` for a list of prompts."""
        ids = jnp.asarray(tokenize(self.tokenizer, list(prompts)))
        return jax.jit(self.text_encoder.apply)({"params": self.params["text_encoder"]}, ids).last_hidden_state

    # --------------------------------------------------------------------- text conditioning (every pipeline)
    # The one place where a backbone's text enters the UNet. Identity pipelines call these four members and stay
    # backbone-generic; StableDiffusionXL implements the same members with its two encoders and added conditioning.
    @property
    def text_encoders(self) -> tuple:
        """The text-encoder modules (part of what identifies a compiled program)."""
        return (self.text_encoder,)

    def text_inputs(self, prompts: Sequence[str], negatives: Sequence[str], *, negative_given: bool,
                    height: int, width: int, micro_conditioning: Mapping[str, Any] | None = None) -> tuple[dict, Any]:
        """Host side, before compiling: ``(inputs, mode)`` — the arrays :meth:`text_conditioning` reads (token ids
        of the prompts and negatives) and the static mode the program depends on (none on SD1.x).
        ``micro_conditioning`` is SDXL's; given here it is refused."""
        given = sorted(k for k, v in (micro_conditioning or {}).items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)}: SDXL micro-conditioning, but this base model is {self.backbone}")
        return {"ids": jnp.asarray(tokenize(self.tokenizer, list(prompts))),
                "negative_ids": jnp.asarray(tokenize(self.tokenizer, list(negatives)))}, None

    def text_conditioning(self, params: Mapping, inputs: Mapping, *, guided: bool, mode: Any = None
                          ) -> TextConditioning:
        """Traced: the prompts' (and, when ``guided``, the negatives') CLIP last hidden states."""
        def encode(ids):
            return self.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state

        return TextConditioning(encode(inputs["ids"]), encode(inputs["negative_ids"]) if guided else None)

    @property
    def pooled_text_dim(self) -> int:
        """Width of :meth:`pooled_text` (what DynamicID's IMR reads): CLIP's hidden size."""
        return self.text_encoder.config.hidden_size

    def pooled_text_ids(self, texts: Sequence[str]) -> jax.Array:
        """Host side: the token ids :meth:`pooled_text` reads."""
        return jnp.asarray(tokenize(self.tokenizer, list(texts)))

    def pooled_text(self, params: Mapping, ids: jax.Array) -> jax.Array:
        """Traced: the pooled text embedding ``[B, pooled_text_dim]`` (CLIP's pooled output)."""
        return self.text_encoder.apply({"params": params["text_encoder"]}, ids).pooler_output

    def _sample_fn(self, key: SamplerKey):
        """``(chunk, finish)``: ``chunk(params, cond_ids, uncond_ids, guidance, carry, start, stop)`` runs the
        denoising steps ``start ≤ i < stop`` (text encoding included: it is cheap, and keeps the chunks
        stateless); ``finish(params, latents)`` decodes. See :func:`~dynamicid_jax.pipelines.sampling.run_in_chunks`."""
        def chunk(params, cond_ids, uncond_ids, guidance_scale, carry, start, stop):
            text = self.text_conditioning(params, {"ids": cond_ids, "negative_ids": uncond_ids}, guided=key.guided)
            return denoise_steps(self.unet, params["unet"], carry, start, stop, text.context, guidance_scale,
                                 self.scheduler, uncond_context=text.uncond_context)

        def finish(params, latents):
            return to_uint8(decode_latents(self.vae, params["vae"], latents))

        return jax.jit(chunk), jax.jit(finish)

    def generate(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int = 512, width: int = 512, steps: int = 50, guidance_scale: float = 7.5,
                 seed: int = 0, latents: np.ndarray | None = None) -> np.ndarray:
        """Text-to-image: ``uint8 [B, height, width, 3]``; deterministic for a given ``seed``.

        Guidance is on when ``guidance_scale > 1`` (one batched UNet call of ``2B`` rows per step).
        ``latents`` (optional, ``[B, height/f, width/f, C]``, f = :attr:`vae_scale_factor`) replaces the seed's
        initial noise."""
        prompts, negatives, guidance_scale = check_text_request(self, prompts, negative_prompt, height, width, steps,
                                                                guidance_scale)
        noise = start_noise(self, len(prompts), height, width, seed, latents)
        key = SamplerKey(len(prompts), height, width, steps, guidance_scale > 1.0)
        carry = initial_carry(self.scheduler, steps, noise)  # checks the step count before compiling
        args = (self.params, jnp.asarray(tokenize(self.tokenizer, prompts)),
                jnp.asarray(tokenize(self.tokenizer, negatives)), jnp.float32(guidance_scale))
        timings = {}
        if key not in self._compiled:
            start = time.perf_counter()
            chunk, finish = self._sample_fn(key)
            self._compiled[key] = (chunk.lower(*args, carry, jnp.int32(0), jnp.int32(1)).compile(),
                                   finish.lower(self.params, carry[0]).compile())
            timings["compile_s"] = time.perf_counter() - start
        chunk, finish = self._compiled[key]
        start = time.perf_counter()
        carry = run_in_chunks(lambda c, lo, hi: chunk(*args, c, lo, hi), carry, steps)
        images = np.asarray(jax.block_until_ready(finish(self.params, carry[0])))
        timings["run_s"] = time.perf_counter() - start
        self.last_timings = timings
        return images

    @property
    def num_compiled(self) -> int:
        """How many sampler programs have been compiled (one per distinct shape / step count / guidance mode)."""
        return len(self._compiled)


def check_text_request(pipe, prompts: str | Sequence[str], negative_prompt, height: int, width: int, steps: int,
                       guidance_scale: float, *, what: str = "prompts", streams: int = 1
                       ) -> tuple[list[str], list[str], float]:
    """The checks every pipeline makes before compiling — prompts, negative prompts, sizes, steps, a finite
    guidance, the request's memory — → ``(prompts, negatives, guidance_scale)``. ``pipe``: anything with
    ``size_multiple()``, ``vae_scale_factor`` and ``unet``; ``streams``: UNet rows per image and guidance branch
    (Infinite-ID's two streams)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a non-empty string or list of strings")
    negatives = _broadcast_negative(negative_prompt, len(prompts))
    factor = pipe.size_multiple()
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_prompts(prompts)
    guidance_scale = check_number("guidance_scale", guidance_scale, low=0.0)
    check_request_size(pipe.unet.config, pipe.vae_scale_factor, len(prompts), height, width,
                       guided=guidance_scale > 1.0, streams=streams)
    return prompts, negatives, guidance_scale


def start_noise(pipe, batch: int, height: int, width: int, seed: int, latents: np.ndarray | None) -> jax.Array:
    """The initial latents ``[batch, height/f, width/f, C]``: the seed's noise, or ``latents`` (shape checked)."""
    f = pipe.vae_scale_factor
    shape = (batch, height // f, width // f, pipe.unet.config.in_channels)
    if latents is None:
        return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    noise = jnp.asarray(latents, jnp.float32)
    if noise.shape != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(noise.shape)}")
    return noise


def _broadcast_negative(negative: str | Sequence[str] | None, batch: int) -> list[str]:
    if negative is None or isinstance(negative, str):
        return [negative or ""] * batch
    negative = list(negative)
    if len(negative) != batch:
        raise ValueError(f"negative_prompt has {len(negative)} entries for {batch} prompts (give one string, or one "
                         f"per prompt)")
    if not all(isinstance(n, str) for n in negative):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative!r}")
    return negative
