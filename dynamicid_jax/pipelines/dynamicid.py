"""DynamicID inference: reference photos → ID tokens (→ IMR edits) → SAA Stable Diffusion
(docs/method.md §2–§5).

    pipe = DynamicIDPipeline.from_pretrained("sd15/", "dynamicid/", analyzer="insightface",
                                             clip_vision_path="CLIP-ViT-H-14/")
    images = pipe("a portrait of two people, in a bus", references=["alice.jpg", "bob.jpg"])   # uint8 [1,H,W,3]
    images, gates = pipe("a photo of a woman", references=["alice.jpg"],
                         face_prompts=["a very surprised expression, front view"], return_gates=True)
    save_gate_overlay(gates, images[0], "gates.png")
    xl = DynamicIDPipeline.from_pretrained("sdxl-base/", "dynamicid-sdxl/", ...)   # SDXL base, SDXL-trained weights

**Backbones**: SD1.x and SDXL, read from the base folder / file. The pipeline reaches the backbone's text only
through its conditioning members (``text_inputs`` / ``text_conditioning`` / ``pooled_text``, see
:class:`~dynamicid_jax.pipelines.stable_diffusion.TextConditioning`): on SDXL the context is both encoders' 2048-wide
states, the UNet also gets the pooled text and the micro-conditioning, and the IMR reads the 1280-wide pooled
embedding. Weights belong to one backbone (recorded in the folder); another backbone's are refused.

**Per reference** (host, then small jitted functions): the analyzer finds the face (:func:`reference_face`: no
face → :class:`NoFaceError`; several → the largest with a warning, ``strict=True`` raises); its embedding and the
CLIP vision tower's penultimate hidden states of the *whole* image (standard CLIP preprocessing) go through the
:class:`IDEncoder` → 4 tokens per identity. With a face prompt the identity's tokens are edited by the IMR: the
source motion is the landmark raster of the reference plus an automatic source prompt from the analyzer's pose
(:func:`auto_face_prompt`, "neutral" expression — no emotion classifier here), the target motion the face prompt
plus a target raster (default: the source raster); the texts are the pooled SD text-encoder outputs and the
KeyPointEncoder runs in eval mode. Classifier-free guidance's negative rows get the unconditional ID tokens
``encoder(zeros, CLIP(mean-grey image))`` once per identity, never through the IMR.

**Sampling**: context ``[77 text tokens | ID₀ ×4 | … | ID_{N−1} ×4]``; text encoding, the whole denoising loop
(the layout boost is a pure function of the step index: :func:`saa_inputs_for_step`) and the VAE decode are one
XLA program, compiled once per (batch, size, steps, guidance on/off, number of identities, routing/mixing,
gate on/off) and reused — also by other pipelines built from the same architecture; ``id_scale``, boxes, boost
and ``guidance_scale`` are traced values. The loop also
accumulates every cross-attention's gate (the mean over the steps, conditional rows), returned as
:class:`~dynamicid_jax.pipelines.gates.GateMaps` with ``return_gates=True``.

**What ``id_scale=0`` means**: SAA computes ``to_out(h_txt + id_scale·w⊙h_id)`` (+ the LoRAs), so at 0 the ID
branch contributes exactly nothing and the result is the *SAA model's own* text-to-image (LoRA included) for
the same seed. With untrained LoRAs (``up = 0``) that is exactly the base :class:`StableDiffusion` (tested).

**Converted weights folder** (``dynamicid_path``; written by ``python -m infer.convert`` from the official
``SAA.bin`` / ``IMR.bin`` / ``key_point_encoder.bin``, or by :func:`save_dynamicid`)::

    dynamicid.json                              {"format": "dynamicid-jax/dynamicid-v1", "parts": [...],
                                                 "backbone": "SD1.x" | "SDXL"}  (older folders: none;
                                                 the SAA's UNet config tells)
    id_encoder.safetensors + id_encoder.json    IDEncoder params + IDEncoderConfig  (SAA.bin["proj_module"])
    saa.safetensors + saa.json                  SAA params, flat Flax paths ("down_blocks_0/…/attn2/to_k_ip/kernel")
                                                + the SAA strategy fields and the UNet config they belong to
                                                (SAA.bin["SAA_module"])
    imr.safetensors + imr.json                  optional: IMR params + IMRConfig  (IMR.bin)
    keypoint_encoder.safetensors + .json        optional (with imr): params + batch_stats  (key_point_encoder.bin)

All weights fp32; the JSON files are written after their weights and the folder appears complete or not at all.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax import faces as F
from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr as imr_mod
from dynamicid_jax.methods import saa as saa_mod
from dynamicid_jax.methods.dynamicid_weights import (  # noqa: F401  (the folder format, re-exported)
    FOLDER_FORMAT,
    MANIFEST,
    DynamicIDWeights,
    backbone_of,
    check_overwritable,
    check_saa_shapes,
    load_dynamicid,
    save_dynamicid,
)
from dynamicid_jax.models.clip import clip_preprocess, load_image_encoder
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import decode_latents
from dynamicid_jax.pipelines.gates import GateMaps
from dynamicid_jax.pipelines.sampling import check_number
from dynamicid_jax.pipelines.sampling import denoise_steps, initial_carry, run_in_chunks, shared_program, to_uint8
from dynamicid_jax.pipelines.stable_diffusion import SamplerKey as TextSamplerKey
from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion, check_text_request, start_noise
from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL

__all__ = ["DynamicIDWeights", "save_dynamicid", "load_dynamicid", "DynamicIDPipeline", "default_boost",
           "FOLDER_FORMAT"]

DEFAULT_BOOST = (12, 2.0)  # (steps, strength s) for multi-ID and single-ID layout control (docs/method.md §4.5)


# =========================================================================================================
# The pipeline
# =========================================================================================================
@dataclasses.dataclass(frozen=True)
class SamplerKey(TextSamplerKey):
    """The text-to-image key (batch, size, steps, guidance on / off) and what DynamicID compiles in besides."""

    num_ids: int
    mode: str
    activate_query: bool
    text_mode: Any = None  # the backbone's static text mode (SDXL: zero negative embeddings)


def default_boost(num_ids: int, boxes_given: bool) -> tuple[int, float]:
    """The default ``(boost_steps, strength)`` (docs/method.md §4.5): one identity without boxes → no boost; one
    identity with a box (layout control) or several identities → s = 2 for 12 steps."""
    return (0, 0.0) if num_ids == 1 and not boxes_given else DEFAULT_BOOST


def _as_list(value, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what} must not be empty")
        return list(value)
    return [value]


@dataclasses.dataclass
class DynamicIDPipeline:
    """DynamicID on a Stable Diffusion model (see the module docstring). Build with :meth:`from_pretrained`."""

    sd: StableDiffusion | StableDiffusionXL  # the base: text encoder(s), VAE, tokenizer(s), scheduler, base UNet
    unet: UNet2DConditionModel  # the SAA UNet
    unet_params: dict  # base + SAA params
    image_encoder: Any  # CLIPVisionModelWithProjection
    image_encoder_params: dict
    id_encoder: ide.IDEncoder
    id_encoder_params: dict
    analyzer: Any  # a FaceAnalyzer
    imr: imr_mod.IMR | None = None
    imr_params: dict | None = None
    keypoint_encoder: imr_mod.KeyPointEncoder | None = None
    keypoint_encoder_variables: dict | None = None
    strict: bool = False  # several faces in a reference → error instead of the largest face + a warning
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    _fns: dict = dataclasses.field(default_factory=dict, repr=False)  # jitted helpers and cached arrays
    last_timings: dict = dataclasses.field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, sd_path: str | os.PathLike | StableDiffusion | StableDiffusionXL,
                        dynamicid_path: str | os.PathLike, *,
                        analyzer: str | Any = "insightface", analyzer_kwargs: dict | None = None,
                        clip_vision_path: str | os.PathLike | None = None, dtype=jnp.float32,
                        scheduler: str | None = "ddim", config: str | os.PathLike | None = None,
                        strict: bool = False) -> "DynamicIDPipeline":
        """Load the base model — SD1.x or SDXL, read from the folder or file as ``infer.generate --model`` does
        (:func:`~dynamicid_jax.pipelines.stable_diffusion_xl.is_sdxl`): a diffusers folder or single-file
        ``.safetensors`` (``config``/``scheduler`` as in :meth:`StableDiffusion.from_pretrained`), or an already
        loaded :class:`StableDiffusion` / :class:`StableDiffusionXL` —, the converted DynamicID folder (its weights
        must belong to the same backbone), the CLIP vision tower (``clip_vision_path``: a
        ``CLIPVisionModelWithProjection`` folder, CLIP-ViT-H-14 for the official weights; default
        ``<dynamicid_path>/image_encoder``) and the face analyzer (a registered backend name built with
        ``analyzer_kwargs``, or an analyzer object). ``dtype`` is the compute dtype (params stay fp32); a loaded
        base keeps its own dtype, scheduler and configs."""
        from dynamicid_jax.weights.keymap import is_sdxl

        weights = load_dynamicid(dynamicid_path)
        loaded = isinstance(sd_path, (StableDiffusion, StableDiffusionXL))
        base = sd_path.backbone if loaded else ("SDXL" if is_sdxl(sd_path) else "SD1.x")
        if weights.backbone != base:  # before loading a multi-GB base for nothing
            what = f"the base model {os.fspath(sd_path)}" if not loaded else "the given base model"
            raise ValueError(f"{os.fspath(dynamicid_path)} holds DynamicID weights for {weights.backbone}, but "
                             f"{what} is {base}: use weights trained on {base} (DynamicID weights work only on the "
                             f"backbone they were trained on)")
        if clip_vision_path is None:
            clip_vision_path = os.path.join(os.fspath(dynamicid_path), "image_encoder")
            if not os.path.isdir(clip_vision_path):
                raise ValueError("clip_vision_path is required: a CLIPVisionModelWithProjection folder (the official "
                                 "weights use laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
        if loaded:
            sd = sd_path
        else:
            base_class = StableDiffusionXL if base == "SDXL" else StableDiffusion
            sd = base_class.from_pretrained(sd_path, config=config, scheduler=scheduler, dtype=dtype)
        image_encoder, image_params = load_image_encoder(clip_vision_path, dtype=dtype)
        if isinstance(analyzer, str):
            analyzer = F.get_analyzer(analyzer, **(analyzer_kwargs or {}))
        elif analyzer_kwargs:
            raise ValueError("analyzer_kwargs only apply when analyzer is a backend name")
        return cls.from_weights(sd, weights, image_encoder, image_params, analyzer, dtype=dtype, strict=strict)

    @classmethod
    def from_weights(cls, sd: StableDiffusion | StableDiffusionXL, weights: DynamicIDWeights, image_encoder,
                     image_encoder_params, analyzer, *, dtype=jnp.float32,
                     strict: bool = False) -> "DynamicIDPipeline":
        """Assemble from loaded parts, checking that they fit together."""
        if not isinstance(analyzer, F.FaceAnalyzer):
            raise TypeError(f"analyzer must be a FaceAnalyzer (analyze, embedding_dim, num_landmarks), got "
                            f"{type(analyzer).__name__}")
        if weights.backbone != sd.backbone:
            raise ValueError(f"the DynamicID weights are for {weights.backbone}, but the base model is "
                             f"{sd.backbone}: use weights trained on {sd.backbone}")
        ucfg, enc = sd.unet.config, weights.id_encoder_config
        text_dim, vision_dim = sd.pooled_text_dim, image_encoder.config.hidden_size
        problems = []
        if enc.id_embed_dim != analyzer.embedding_dim:
            problems.append(f"the ID encoder takes {enc.id_embed_dim}-d face embeddings but the analyzer "
                            f"{type(analyzer).__name__} gives {analyzer.embedding_dim}-d ones (official weights: "
                            f"insightface, 512-d)")
        if enc.dim != ucfg.cross_attention_dim:
            problems.append(f"ID tokens are {enc.dim} wide, the UNet's cross-attention takes "
                            f"{ucfg.cross_attention_dim}")
        if enc.clip_dim != vision_dim:
            problems.append(f"the ID encoder expects {enc.clip_dim}-wide CLIP features, the vision tower gives "
                            f"{vision_dim}")
        if enc.num_tokens != weights.saa.num_id_tokens:
            problems.append(f"{enc.num_tokens} ID tokens per identity, SAA expects {weights.saa.num_id_tokens}")
        if weights.has_imr:
            icfg, kcfg = weights.imr_config, weights.keypoint_encoder_config
            if icfg.embedding_dim != enc.dim or icfg.num_queries != enc.num_tokens:
                problems.append(f"the IMR edits [{icfg.num_queries}, {icfg.embedding_dim}] tokens, the ID encoder "
                                f"makes [{enc.num_tokens}, {enc.dim}]")
            if icfg.txt_dim != text_dim:
                problems.append(f"the IMR takes {icfg.txt_dim}-d pooled text, the {sd.backbone} text encoder gives "
                                f"{text_dim}")
            if kcfg.embedding_dim != icfg.embedding_dim:
                problems.append(f"KeyPointEncoder width {kcfg.embedding_dim} != IMR landmark width "
                                f"{icfg.embedding_dim}")
        if problems:
            raise ValueError("the DynamicID weights do not fit this model: " + "; ".join(problems))
        check_saa_shapes(weights.saa_params, weights.saa, ucfg,
                         f"the DynamicID SAA weights (converted for a UNet with "
                         f"{len(weights.saa_unet_config.block_out_channels)} blocks of "
                         f"{weights.saa_unet_config.block_out_channels}) on this model's UNet")
        if weights.has_imr and analyzer.num_landmarks != 106:
            warnings.warn(f"the IMR's landmark rasters come from a {analyzer.num_landmarks}-point analyzer; "
                          "checkpoints trained on insightface's 106 points (the official ones) have never seen "
                          "such rasters", stacklevel=3)
        unet = UNet2DConditionModel(ucfg, strategy=weights.saa, dtype=dtype)
        to_device = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
        return cls(sd=sd, unet=unet, unet_params=saa_mod.merge_params(sd.params["unet"], to_device(weights.saa_params)),
                   image_encoder=image_encoder, image_encoder_params=image_encoder_params,
                   id_encoder=ide.IDEncoder(enc, dtype=dtype), id_encoder_params=to_device(weights.id_encoder_params),
                   analyzer=analyzer,
                   imr=imr_mod.IMR(weights.imr_config, dtype=dtype) if weights.has_imr else None,
                   imr_params=to_device(weights.imr_params) if weights.has_imr else None,
                   keypoint_encoder=(imr_mod.KeyPointEncoder(weights.keypoint_encoder_config, dtype=dtype)
                                     if weights.has_imr else None),
                   keypoint_encoder_variables=(to_device(weights.keypoint_encoder_variables)
                                               if weights.has_imr else None),
                   strict=strict)

    # ------------------------------------------------------------------------------------------- identities
    def _fn(self, name: str):
        if name in self._fns:
            return self._fns[name]
        if name == "encode":
            def run(clip_params, id_params, embeds, pixels):
                feats = self.image_encoder.apply({"params": clip_params}, pixels).hidden_states[-2]
                return self.id_encoder.apply({"params": id_params}, embeds, feats)
        elif name == "edit":
            def run(imr_params, kpe_vars, text_params, tokens, rasters, text_ids):
                pooled = self.sd.pooled_text(text_params, text_ids)
                landmark = self.keypoint_encoder.apply(kpe_vars, rasters, train=False)
                return self.imr.apply({"params": imr_params}, tokens, landmark[:1], pooled[:1], landmark[1:],
                                      pooled[1:])
        else:
            raise KeyError(name)
        self._fns[name] = jax.jit(run)
        return self._fns[name]

    def unconditional_tokens(self, num_ids: int = 1) -> jax.Array:
        """CFG's negative ID tokens ``[num_ids, 4, D]``: ``encoder(zeros(D), CLIP(normalised zeros))`` repeated."""
        if "uncond" not in self._fns:
            size = self.image_encoder.config.image_size
            zeros = jnp.zeros((1, self.id_encoder.config.id_embed_dim), jnp.float32)
            self._fns["uncond"] = self._fn("encode")(self.image_encoder_params, self.id_encoder_params, zeros,
                                                     ide.unconditional_clip_pixels(1, size))
        return jnp.repeat(self._fns["uncond"], num_ids, axis=0)

    def encode_identities(self, references: Sequence[Any] | Any, face_prompts: Sequence[str | None] | None = None,
                          *, target_landmarks: Sequence[Any] | None = None,
                          source_face_prompts: Sequence[str | None] | None = None,
                          strict: bool | None = None) -> jax.Array:
        """Reference images (paths, PIL images or RGB ``uint8`` arrays; one identity each) → ID tokens
        ``[N, 4, D]`` in reference order, edited by the IMR where ``face_prompts[i]`` is given.

        ``target_landmarks[i]``: a 96×96 landmark image / raster for identity ``i``'s target (default: its source
        raster); ``source_face_prompts[i]`` overrides the automatic source prompt."""
        strict = self.strict if strict is None else strict
        images = [F.load_rgb(im, f"reference image {i}") for i, im in enumerate(_as_list(references, "references"))]
        n = len(images)
        face_prompts = self._per_identity(face_prompts, n, "face_prompts")
        target_landmarks = self._per_identity(target_landmarks, n, "target_landmarks")
        source_face_prompts = self._per_identity(source_face_prompts, n, "source_face_prompts")
        for i, p in enumerate(face_prompts):
            if p is not None and (not isinstance(p, str) or not p.strip()):
                raise ValueError(f"face_prompts[{i}] must be non-empty text or None (no edit), got {p!r}")
        if any(p is not None for p in face_prompts) and self.imr is None:
            raise ValueError("face prompts need the IMR, but this DynamicID folder has none (convert it with "
                             "--imr IMR.bin)")
        faces = [F.reference_face(self.analyzer, im, strict, what=f"reference image {i}")
                 for i, im in enumerate(images)]
        embeds = jnp.asarray(np.stack([f.embedding for f in faces]), jnp.float32)
        pixels = jnp.asarray(clip_preprocess(images, size=self.image_encoder.config.image_size))
        tokens = self._fn("encode")(self.image_encoder_params, self.id_encoder_params, embeds, pixels)
        rows = []
        for i in range(n):
            if face_prompts[i] is None:
                rows.append(tokens[i:i + 1])
                continue
            source = F.landmark_raster(images[i], self.analyzer, strict)
            target = source if target_landmarks[i] is None else _raster(target_landmarks[i], i)
            src_prompt = source_face_prompts[i] or F.auto_face_prompt(faces[i].pose)
            text_ids = self.sd.pooled_text_ids([src_prompt, face_prompts[i]])
            rows.append(self._fn("edit")(self.imr_params, self.keypoint_encoder_variables,
                                         self._text_params(), tokens[i:i + 1],
                                         jnp.asarray(np.stack([source, target])), text_ids))
        return jnp.concatenate(rows, axis=0)

    def _text_params(self) -> dict:
        """The base's text-encoder params (``text_encoder``, and ``text_encoder_2`` on SDXL)."""
        return {k: v for k, v in self.sd.params.items() if k.startswith("text_encoder")}

    @staticmethod
    def _per_identity(values, n: int, what: str) -> list:
        if values is None:
            return [None] * n
        if isinstance(values, str) or not isinstance(values, (list, tuple)):
            raise ValueError(f"{what} must be a list with one entry per reference ({n}), got {type(values).__name__}")
        if len(values) != n:
            raise ValueError(f"{what} has {len(values)} entries for {n} reference image(s); give one per reference "
                             f"(None for none)")
        return list(values)

    # ------------------------------------------------------------------------------------------------ sampling
    def _sample_fn(self, key: SamplerKey):
        """``(chunk, finish)``: ``chunk(..., carry, start, stop) -> (carry, gate sums)`` runs the denoising steps
        ``start ≤ i < stop`` (:func:`~dynamicid_jax.pipelines.sampling.run_in_chunks`); ``finish`` decodes."""
        sd, unet = self.sd, self.unet

        def chunk(params, text_inputs, id_tokens, uncond_tokens, guidance_scale, inputs,
                  boost_steps, boost_strength, carry, start, stop):
            def with_ids(text, tokens):  # every row reads all identities' tokens, identity by identity
                return saa_mod.saa_context(text, tokens.reshape(1, -1, tokens.shape[-1]))

            # the backbone's text conditioning (SD1.x: CLIP states; SDXL: both encoders, pooled text and
            # micro-conditioning as added conditioning), with the ID tokens appended to each context
            text = sd.text_conditioning(params, text_inputs, guided=key.guided, mode=key.text_mode)
            context = with_ids(text.context, id_tokens)
            uncond = with_ids(text.uncond_context, uncond_tokens) if key.guided else None
            step_inputs = lambda i: saa_mod.saa_inputs_for_step(inputs, i, boost_steps, boost_strength)  # noqa: E731
            return denoise_steps(unet, params["unet"], carry, start, stop, context, guidance_scale, sd.scheduler,
                                 attention_inputs=step_inputs, uncond_context=uncond, collect_gates=True,
                                 added_cond=text.added, uncond_added_cond=text.uncond_added)

        def finish(params, latents):
            return to_uint8(decode_latents(sd.vae, params["vae"], latents))

        return jax.jit(chunk), jax.jit(finish)

    def __call__(self, prompt: str | Sequence[str], references: Sequence[Any] | Any | None = None, *,
                 face_prompts: Sequence[str | None] | None = None, target_landmarks: Sequence[Any] | None = None,
                 source_face_prompts: Sequence[str | None] | None = None, id_tokens: Any = None,
                 boxes: Any = None, layout: str | Sequence[float] = "row",
                 negative_prompt: str | Sequence[str] | None = None, steps: int = 50, guidance_scale: float = 5.0,
                 seed: int = 0, height: int | None = None, width: int | None = None, id_scale: float = 1.0,
                 boost_steps: int | None = None, boost_strength: float | None = None, mix: float = 0.5,
                 activate_query: bool = True, return_gates: bool = False, strict: bool | None = None,
                 latents: np.ndarray | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None):
        """Generate ``uint8 [B, height, width, 3]`` (B = number of prompts; every image shows all identities), and
        with ``return_gates=True`` also the :class:`GateMaps`.

        ``references``: one image per identity (or precomputed ``id_tokens [N, 4, D]`` instead). ``boxes``:
        normalised ``[y0, x0, y1, x1]``, one per identity (routing) or one for several (mixing with ``mix``); by
        default ``layout`` places them (``"row"``: equal vertical strips left → right, ``"grid"``, or relative
        widths). ``boost_steps``/``boost_strength``: the layout boost (default :func:`default_boost`).
        ``activate_query=False``: no gate, routing or boost (the "w/o SAA" baseline). ``id_scale=0``: the model's
        text-to-image for the same seed. ``latents`` replaces the seed's initial noise. ``height`` / ``width``
        default to the backbone's size (512 SD1.x, 1024 SDXL). SDXL only: the micro-conditioning
        ``original_size``, ``crops_coords_top_left``, ``target_size`` as in :meth:`StableDiffusionXL.generate`."""
        height = self.sd.default_size if height is None else height
        width = self.sd.default_size if width is None else width
        prompts, negatives, guidance_scale = check_text_request(self.sd, prompt, negative_prompt, height, width,
                                                                steps, guidance_scale, what="prompt")
        text_inputs, text_mode = self.sd.text_inputs(
            prompts, negatives, negative_given=negative_prompt is not None, height=height, width=width,
            micro_conditioning={"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                                "target_size": target_size})
        id_scale = check_number("id_scale", id_scale)
        mix = check_number("mix", mix, low=0.0, high=1.0)
        if boost_strength is not None:
            boost_strength = check_number("boost_strength", boost_strength, low=0.0)
        latent_grid = (height // self.sd.vae_scale_factor, width // self.sd.vae_scale_factor)
        known = len(references) if isinstance(references, (list, tuple)) else (
            int(np.shape(id_tokens)[0]) if id_tokens is not None and np.ndim(id_tokens) == 3 else None)
        if known:  # boxes and layout checked before any face detection or compile
            saa_mod.saa_inputs(known, (height, width), boxes, mix=mix, layout=layout, latent_grid=latent_grid)
        timings = {}
        start = time.perf_counter()
        if id_tokens is None:
            if references is None:
                raise ValueError("give references (one image per identity) or id_tokens")
            tokens = self.encode_identities(references, face_prompts, target_landmarks=target_landmarks,
                                            source_face_prompts=source_face_prompts, strict=strict)
        else:
            if references is not None or face_prompts is not None:
                raise ValueError("give either references (with optional face_prompts) or id_tokens, not both")
            tokens = jnp.asarray(id_tokens, jnp.float32)
            want = (self.id_encoder.config.num_tokens, self.id_encoder.config.dim)
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != want:
                raise ValueError(f"id_tokens must be [N, {want[0]}, {want[1]}], got {tuple(tokens.shape)}")
        num_ids = int(tokens.shape[0])
        defaults = default_boost(num_ids, boxes is not None)
        boost_steps = defaults[0] if boost_steps is None else boost_steps
        boost_strength = defaults[1] if boost_strength is None else boost_strength
        if not isinstance(boost_steps, (int, np.integer)) or boost_steps < 0:
            raise ValueError(f"boost_steps must be a non-negative integer, got {boost_steps!r}")
        boost_strength = check_number("boost_strength", boost_strength, low=0.0)
        inputs = saa_mod.saa_inputs(num_ids, (height, width), boxes, id_scale=id_scale, mix=mix,
                                    activate_query=activate_query, layout=layout, latent_grid=latent_grid)
        timings["encode_s"] = time.perf_counter() - start

        guided = guidance_scale > 1.0
        key = SamplerKey(len(prompts), height, width, steps, guided, num_ids, inputs.mode, bool(activate_query),
                         text_mode if guided else None)
        noise = start_noise(self.sd, len(prompts), height, width, seed, latents)
        params = {**self.sd.params, "unet": self.unet_params}
        carry = initial_carry(self.sd.scheduler, steps, noise)  # checks the step count before compiling
        args = (params, text_inputs, tokens, self.unconditional_tokens(num_ids), jnp.float32(guidance_scale),
                inputs, jnp.int32(boost_steps), jnp.float32(boost_strength))
        if key not in self._compiled:
            def build():
                chunk_fn, finish_fn = self._sample_fn(key)
                return (chunk_fn.lower(*args, carry, jnp.int32(0), jnp.int32(1)).compile(),
                        finish_fn.lower(params, carry[0]).compile())

            start = time.perf_counter()
            self._compiled[key], built = shared_program(
                ("dynamicid", self.unet, self.sd.vae, *self.sd.text_encoders, self.sd.scheduler, key), build)
            if built:
                timings["compile_s"] = time.perf_counter() - start
        chunk, finish = self._compiled[key]
        start = time.perf_counter()
        sums: dict = {}

        def add_gates(out):  # the chunks' gate sums, added up on device
            new_carry, chunk_sums = out
            sums.update({k: sums[k] + v if k in sums else v for k, v in chunk_sums.items()})
            return new_carry

        carry = run_in_chunks(lambda c, lo, hi: chunk(*args, c, lo, hi), carry, steps, on_chunk=add_gates)
        images = jax.block_until_ready(finish(params, carry[0]))
        gates = {k: v / steps for k, v in sums.items()}
        timings["run_s"] = time.perf_counter() - start
        self.last_timings = timings
        images = np.asarray(images)
        if not return_gates:
            return images
        maps = {}
        for name, g in gates.items():
            gh, gw = saa_mod.layer_grid(g.shape[-1], (height, width))
            maps[name] = np.asarray(g).reshape(g.shape[0], gh, gw)
        return images, GateMaps(maps, np.asarray(inputs.boxes), inputs.mode, num_ids, (height, width),
                                bool(activate_query))

    @property
    def num_compiled(self) -> int:
        """How many sampler programs this pipeline has used (compiled, or shared by an identical pipeline)."""
        return len(self._compiled)


def _raster(value: Any, index: int) -> np.ndarray:
    """A target landmark input → ``[96, 96, 1]`` float32 in ``[-1, 1]``: a float raster as is, else an image."""
    arr = value if isinstance(value, np.ndarray) else None
    if arr is not None and arr.dtype.kind == "f":
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1) if arr.ndim in (2, 3) else arr
        if arr.shape != (imr_mod.RASTER_SIZE, imr_mod.RASTER_SIZE, 1):
            raise ValueError(f"target_landmarks[{index}]: a float raster must be [96, 96(, 1)], got {value.shape}")
        return arr.astype(np.float32)
    return F.raster_from_image(value)
