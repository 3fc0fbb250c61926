"""Infinite-ID inference: a text stream and an ID stream in one batched, jitted UNet call per step (docs/method.md §7).

    pipe = InfiniteIDPipeline.from_pretrained("sd15/", weights="infinite_id/", image_encoder="clip-h/")
    images = pipe("a woman in watercolor painting style", references=["me.jpg"])      # uint8 [1, 512, 512, 3]

The base is SD1.x or SDXL (read from the folder or file). On SDXL both streams get SDXL's 2048-wide context and the
same added conditioning (pooled text, micro-conditioning), through the base's ``text_conditioning``.

Per step the UNet sees ``[uncond: text rows, ID rows; cond: text rows, ID rows]``. Both streams start from the
same noise (the seed's, exactly what :meth:`StableDiffusion.generate` draws). The text stream is the unchanged
base model, so its image equals plain text-to-image. The ID stream's self-attention mixes in the text stream's
keys/values (:mod:`dynamicid_jax.methods.infinite_id`). Its cross-attention adds ``λ`` × the ID tokens, which
are stacked over all references (identity mixing). Under CFG the ID stream's negative row gets the negative
prompt and the null ID tokens (``encoder(0, CLIP(grey))``), the same tokens ID dropout uses in training.

References go through face analysis (the largest face; none → :class:`~dynamicid_jax.faces.NoFaceError`). The
ArcFace vector feeds the face mapper. CLIP preprocessing, then the CLIP mapper, get what the encoder was trained
on (``encoder.config.clip_input``). ``"aligned"`` is the face crop aligned to the ArcFace template at 224 px
(the 112-px template × 2), as in the paper. ``"image"`` is the whole reference image.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.methods import infinite_id as iid
from dynamicid_jax.methods.infinite_id_weights import load_infinite_id
from dynamicid_jax.models.clip import CLIPVisionModelWithProjection, clip_preprocess
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import decode_latents
from dynamicid_jax.pipelines.sampling import check_number
from dynamicid_jax.pipelines.sampling import denoise_steps, initial_carry, run_in_chunks, shared_program, to_uint8
from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion, check_text_request, start_noise
from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
from dynamicid_jax.weights import keymap as km

ALIGN_SIZE = 224


@dataclasses.dataclass(frozen=True)
class _SamplerKey:
    batch: int
    num_tokens: int
    height: int
    width: int
    steps: int
    guided: bool
    adain: bool
    mix_layers: tuple[int, ...] | None
    text_stream: bool
    text_mode: Any = None  # the backbone's static text mode (SDXL: zero negative embeddings)


@dataclasses.dataclass
class InfiniteIDPipeline:
    """Stable Diffusion + face analyzer + CLIP vision encoder + the Infinite-ID encoder and ID projections.

    ``mix_layers``: the default self-attention layers with mixed attention (indices, see
    :func:`~dynamicid_jax.methods.infinite_id.self_attention_layers`); ``None`` = all."""

    sd: StableDiffusion | StableDiffusionXL
    analyzer: Any  # a dynamicid_jax.faces.FaceAnalyzer
    image_encoder: CLIPVisionModelWithProjection
    image_encoder_params: dict
    encoder: iid.InfiniteIDEncoder
    encoder_params: dict
    id_params: dict
    mix_layers: tuple[int, ...] | None = None
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)
    last_timings: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        cfg = self.encoder.config
        cross = self.sd.unet.config.cross_attention_dim
        if cfg.dim != cross:
            raise ValueError(f"Infinite-ID encoder makes {cfg.dim}-wide tokens but the UNet's cross-attention is "
                             f"{cross} wide")
        if cfg.clip_dim != self.image_encoder.config.hidden_size:
            raise ValueError(f"Infinite-ID encoder expects {cfg.clip_dim}-wide CLIP features but the image encoder "
                             f"is {self.image_encoder.config.hidden_size} wide")
        dim = getattr(self.analyzer, "embedding_dim", cfg.id_embed_dim)
        if dim != cfg.id_embed_dim:
            raise ValueError(f"the face analyzer gives {dim}-d embeddings but the Infinite-ID encoder was trained on "
                             f"{cfg.id_embed_dim}-d ones (ArcFace: 512 via insightface; dlib: 128)")
        self.mix_layers = _resolve_layers(self.sd.unet.config, self.mix_layers)
        self._params = {**self.sd.params, "unet": iid.merge_id_params(self.sd.params["unet"], self.id_params)}

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | StableDiffusion | StableDiffusionXL,
                        weights: str | os.PathLike,
                        image_encoder: str | os.PathLike, *, face_analyzer: Any = "insightface",
                        analyzer_kwargs: dict | None = None, config: str | os.PathLike | None = None,
                        scheduler: str | None = "ddim", dtype=jnp.float32,
                        mix_layers: Sequence[int] | Sequence[str] | None = None) -> "InfiniteIDPipeline":
        """``model``: a diffusers SD1.x or SDXL folder or a single-file checkpoint (the backbone is read from it, as
        ``infer.generate --model`` does), or a loaded :class:`StableDiffusion` / :class:`StableDiffusionXL`;
        ``weights``: a folder written by :func:`~dynamicid_jax.methods.infinite_id_weights.save_infinite_id` (training);
        ``image_encoder``: a CLIP vision folder (CLIP-H for SD1.5); ``face_analyzer``: a backend name for
        :func:`~dynamicid_jax.faces.get_analyzer` (with ``analyzer_kwargs``) or an analyzer object."""
        from dynamicid_jax.faces import get_analyzer
        from dynamicid_jax.models.clip import load_image_encoder

        from dynamicid_jax.weights.keymap import is_sdxl

        if isinstance(model, (StableDiffusion, StableDiffusionXL)):
            sd = model
        else:
            base_class = StableDiffusionXL if is_sdxl(model) else StableDiffusion
            sd = base_class.from_pretrained(model, config=config, scheduler=scheduler, dtype=dtype)
        try:
            enc_cfg, enc_params, id_params = load_infinite_id(os.fspath(weights), sd.unet.config)
        except km.WeightLoadError as e:  # name the backbones: a width mismatch is usually SD1.x weights on SDXL
            raise km.WeightLoadError(f"{e} (the base model is {sd.backbone})") from None
        vision, vision_params = load_image_encoder(image_encoder, dtype=sd.unet.dtype)
        analyzer = get_analyzer(face_analyzer, **(analyzer_kwargs or {})) if isinstance(face_analyzer, str) \
            else face_analyzer
        return cls(sd, analyzer, vision, vision_params, iid.InfiniteIDEncoder(enc_cfg, dtype=sd.unet.dtype),
                   enc_params, id_params, mix_layers=mix_layers)

    # ------------------------------------------------------------------------------------------------ identities
    def _encode(self, embeds: np.ndarray, pixels: np.ndarray) -> jax.Array:
        if "encode" not in self._cache:
            layer = self.encoder.config.clip_layer

            def encode(vision_params, encoder_params, e, px):
                feats = self.image_encoder.apply({"params": vision_params}, px).hidden_states[layer]
                return self.encoder.apply({"params": encoder_params}, e, feats).astype(jnp.float32)

            self._cache["encode"] = jax.jit(encode)
        return self._cache["encode"](self.image_encoder_params, self.encoder_params, jnp.asarray(embeds),
                                     jnp.asarray(pixels))

    def reference_inputs(self, references: Sequence[Any], *, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Face analysis of each reference → ``(ArcFace vectors [n, D], CLIP pixels [n, S, S, 3])``."""
        from dynamicid_jax.faces import align_face, load_rgb, reference_face

        if isinstance(references, (str, os.PathLike)) or (isinstance(references, np.ndarray) and references.ndim == 3):
            references = [references]
        references = list(references)
        if not references:
            raise ValueError("references must hold at least one image of the identity")
        embeds, crops = [], []
        for i, ref in enumerate(references):
            what = f"reference image {i}"
            rgb = load_rgb(ref, what)
            face = reference_face(self.analyzer, rgb, strict, what=what)
            embeds.append(np.asarray(face.embedding, np.float32))
            crops.append(align_face(rgb, face.kps, size=ALIGN_SIZE) if self.encoder.config.clip_input == "aligned"
                         else rgb)
        return np.stack(embeds), clip_preprocess(crops, size=self.image_encoder.config.image_size)

    def identity_tokens(self, references: Sequence[Any], *, strict: bool = False) -> jax.Array:
        """``c_id [1, n·T, dim]``: the tokens of every reference, stacked (identity mixing). Blend two results
        (``a·x + (1−a)·y``) to interpolate identities, then pass it as ``id_tokens``."""
        embeds, pixels = self.reference_inputs(references, strict=strict)
        return iid.stack_identities(self._encode(embeds, pixels))

    def null_tokens(self) -> jax.Array:
        """The "no identity" tokens ``[1, T, dim]``: ``encoder(zeros, CLIP(zero normalised pixels))``."""
        if "null" not in self._cache:
            size = self.image_encoder.config.image_size
            self._cache["null"] = self._encode(np.zeros((1, self.encoder.config.id_embed_dim), np.float32),
                                               np.zeros((1, size, size, 3), np.float32))
        return self._cache["null"]

    # ------------------------------------------------------------------------------------------------ sampling
    def _sample_fn(self, key: _SamplerKey):
        unet = UNet2DConditionModel(self.sd.unet.config, strategy=iid.InfiniteIDAttention(key.mix_layers),
                                    dtype=self.sd.unet.dtype)
        sd = self.sd

        def chunk(params, text_inputs, id_tokens, null_tokens, guidance, id_scale, mix_start, mix_end, carry,
                  start, stop):
            def both_streams(added):  # SDXL's added conditioning: the same for both streams
                return None if added is None else jax.tree_util.tree_map(iid.two_stream_rows, added)

            text = sd.text_conditioning(params, text_inputs, guided=key.guided, mode=key.text_mode)
            context = iid.two_stream_context(text.context, id_tokens)
            uncond = iid.two_stream_context(text.uncond_context, null_tokens) if key.guided else None
            inputs = iid.two_stream_inputs(key.num_tokens, guided=key.guided, id_scale=id_scale, adain=key.adain)
            return denoise_steps(unet, params["unet"], carry, start, stop, context, guidance, sd.scheduler,
                                 uncond_context=uncond,
                                 attention_inputs=lambda i: iid.inputs_for_step(inputs, i, mix_start, mix_end),
                                 added_cond=both_streams(text.added), uncond_added_cond=both_streams(text.uncond_added))

        def finish(params, latents):
            text_latents, id_latents = iid.split_two_streams(latents)
            if not key.text_stream:
                return to_uint8(decode_latents(sd.vae, params["vae"], id_latents))
            images = to_uint8(decode_latents(sd.vae, params["vae"], jnp.concatenate([id_latents, text_latents], 0)))
            return jnp.split(images, 2, axis=0)

        return jax.jit(chunk), jax.jit(finish)

    def __call__(self, prompt: str | Sequence[str], references: Sequence[Any] | None = None,
                 negative_prompt: str | Sequence[str] | None = None, steps: int = 30, guidance_scale: float = 5.0,
                 seed: int = 0, height: int | None = None, width: int | None = None, *,
                 id_tokens: jax.Array | None = None, id_scale: float = 1.0, adain: bool = True,
                 mix_steps: tuple[int, int | None] = (0, None),
                 mix_layers: Sequence[int] | Sequence[str] | None | str = "default",
                 latents: np.ndarray | None = None, strict: bool = False,
                 return_text_stream: bool = False, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Generate ``uint8 [B, height, width, 3]`` images of the reference identity (one per prompt).

        ``references``: images (paths, arrays, PIL) of one person, or several people to mix; or give
        ``id_tokens [1, n·T, dim]`` instead (e.g. an interpolation of :meth:`identity_tokens`).
        ``id_scale`` = λ of the ID cross-attention; ``adain``: AdaIN-mean on the ID stream's K/V; ``mix_steps =
        (start, end)``: denoising steps ``start ≤ i < end`` with mixed attention (``end=None``: to the last);
        ``mix_layers``: ``"default"`` (the pipeline's), ``None`` (all), layer indices or name prefixes such as
        ``("up_blocks",)``. ``return_text_stream=True`` → ``(id_images, text_stream_images)``; the text stream
        is plain text-to-image with the same seed. ``height`` / ``width`` default to the backbone's size (512
        SD1.x, 1024 SDXL). SDXL only: the micro-conditioning ``original_size``, ``crops_coords_top_left``,
        ``target_size`` as in :meth:`StableDiffusionXL.generate` (both streams get the same)."""
        height = self.sd.default_size if height is None else height
        width = self.sd.default_size if width is None else width
        prompts, negatives, guidance_scale = check_text_request(self.sd, prompt, negative_prompt, height, width,
                                                                steps, guidance_scale, what="prompt", streams=2)
        text_inputs, text_mode = self.sd.text_inputs(
            prompts, negatives, negative_given=negative_prompt is not None, height=height, width=width,
            micro_conditioning={"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                                "target_size": target_size})
        id_scale = check_number("id_scale", id_scale)
        start, end = _mix_range(mix_steps, steps)
        if (references is None) == (id_tokens is None):
            raise ValueError("give exactly one of references (images) or id_tokens")
        tokens = self.identity_tokens(references, strict=strict) if id_tokens is None else jnp.asarray(id_tokens)
        per_id = self.encoder.config.num_tokens
        if tokens.ndim != 3 or tokens.shape[0] != 1 or tokens.shape[1] % per_id or tokens.shape[2] != \
                self.encoder.config.dim:
            raise ValueError(f"id_tokens must be [1, n·{per_id}, {self.encoder.config.dim}], got "
                             f"{tuple(tokens.shape)}")
        null = jnp.tile(self.null_tokens(), (1, tokens.shape[1] // per_id, 1))
        layers = self.mix_layers if isinstance(mix_layers, str) and mix_layers == "default" else \
            _resolve_layers(self.sd.unet.config, mix_layers)
        guided = guidance_scale > 1.0
        key = _SamplerKey(len(prompts), int(tokens.shape[1]), height, width, steps, guided,
                          bool(adain), layers, bool(return_text_stream), text_mode if guided else None)
        noise = start_noise(self.sd, len(prompts), height, width, seed, latents)  # = the base's generate
        carry = initial_carry(self.sd.scheduler, steps, iid.two_stream_rows(noise))  # both streams, same noise
        args = (self._params, text_inputs, tokens, null,
                jnp.float32(guidance_scale), jnp.float32(id_scale), jnp.int32(start), jnp.int32(end))
        timings = {}
        if key not in self._compiled:
            def build():
                chunk_fn, finish_fn = self._sample_fn(key)
                return (chunk_fn.lower(*args, carry, jnp.int32(0), jnp.int32(1)).compile(),
                        finish_fn.lower(self._params, carry[0]).compile())

            t0 = time.perf_counter()  # another pipeline of the same architecture may have compiled it already
            self._compiled[key], built = shared_program(
                ("infinite-id", self.sd.unet, self.sd.vae, *self.sd.text_encoders, self.sd.scheduler, key), build)
            if built:
                timings["compile_s"] = time.perf_counter() - t0
        chunk, finish = self._compiled[key]
        t0 = time.perf_counter()
        carry = run_in_chunks(lambda c, lo, hi: chunk(*args, c, lo, hi), carry, steps)
        out = jax.block_until_ready(finish(self._params, carry[0]))
        timings["run_s"] = time.perf_counter() - t0
        self.last_timings = timings
        if return_text_stream:
            return np.asarray(out[0]), np.asarray(out[1])
        return np.asarray(out)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)


def _resolve_layers(unet_config, layers) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if all(isinstance(x, str) for x in layers):
        return iid.self_attention_layers(unet_config, layers)
    allowed = set(iid.self_attention_layers(unet_config))
    if not all(isinstance(x, (int, np.integer)) and int(x) in allowed for x in layers):
        raise ValueError(f"mix_layers must be None, name prefixes or self-attention layer indices from "
                         f"{sorted(allowed)}, got {layers!r}")
    return tuple(sorted(int(x) for x in layers))


def _mix_range(mix_steps, steps: int) -> tuple[int, int]:
    try:
        start, end = mix_steps
    except (TypeError, ValueError):
        raise ValueError(f"mix_steps must be (start, end) denoising-step indices, got {mix_steps!r}") from None
    end = steps if end is None else end
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= steps):
        raise ValueError(f"mix_steps must satisfy 0 ≤ start ≤ end ≤ steps={steps}, got {mix_steps!r}")
    return start, end
