"""Stage 0 (SynthFace, docs/method.md §8): train the tiny Stable Diffusion base from scratch and export it as a
diffusers folder.

    python -m synthface.stage0 --config train/configs/synthface_stage0.yaml data.root=DATA workdir=W [key.sub=value ...]
    python -m synthface.stage0 --config train/configs/synthface_stage0.yaml --quick data.root=DATA workdir=W
    folder = synthface.stage0.run_stage0(synthface.stage0.stage0_config(["data.root=DATA", "workdir=W"]))   # in-process

The same model classes as SD1.5 (``AutoencoderKL``, ``CLIPTextModel``, ``UNet2DConditionModel``), small:
``vae_config("synthface")`` (scale factor 4: 64 px ↔ 16×16×4 latents; the shipped base's config overrides it to
scale factor 2), ``text_config("synthface")`` (SD1.5
tokenizer and vocabulary, 77 positions, width 64), ``unet_config("synthface")`` (``cross_attention_dim`` 64).

* Phase ``vae``: L1 (+ optional MSE) reconstruction of random crops (+ horizontal flips) of the training images and a
  small KL term, with the posterior sampled. The posterior log-variance starts at ``vae.logvar_init`` (a nearly
  deterministic encoder, as SD's VAE ends up); starting at the default init, Adam lets the tiny KL weight hold the
  variance near 1 for the whole of a short run. Then: reconstruction PSNR on held-out identities (posterior mean),
  the latent moments of every training image (kept, the VAE is frozen from here on) and ``scaling_factor`` =
  1 / std of the sampled latents, as SD did.
* Phase ``diffusion``: text encoder and UNet trained jointly, MSE on v (``diffusion.prediction_type``; ``epsilon``
  works too) on the DDPM schedule of SD1.5 (scaled-linear betas, 1000 steps), latents sampled from the stored
  moments each step. Text of an image: its caption; with probability ``p_face_prompt`` the caption + its face
  prompt (``"…, in a happy expression, in side view"``, the text the IMR reads), with ``p_grid_prompt`` the
  caption + its grid prompt (``"…, the expression is happy, the face is fully turned to the left"``), with
  ``p_empty`` the empty prompt (classifier-free guidance). A text
  encoder trained from scratch only knows the words it was trained on: without the face prompts, the expression /
  pose words of later stages would be untrained embeddings. The export holds the EMA of the weights.
* Export: ``{workdir}/export/sd/`` (``StableDiffusion.save_pretrained``: our loader and diffusers read it, with the
  SD1.5 DDPM betas in a DDIM scheduler config) and ``{workdir}/export/stage0_metrics.json`` (steps, losses, VAE
  PSNR, scaling factor, wall-clock per phase, sample checks); ``{workdir}/export/samples.png`` when
  ``sample.count`` > 0: images generated from captions, scored for their background colour.

Both phases run on :class:`train.loop.Trainer` (Orbax checkpoints every ``checkpoint_every`` steps, exact resume:
the whole data set lives on the device and each step draws its batch from ``fold_in(seed, step)``). Every phase
leaves ``{workdir}/{phase}/done.json`` when finished; a rerun with the same workdir resumes an interrupted phase
and skips a finished one. Each phase folder records a fingerprint of the settings and data it depends on
(``phase.json``): a phase made with other settings is an error unless ``on_change=restart``, which removes it and
the phases after it (changing only ``diffusion.*`` keeps the trained VAE).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.file_io import write_json
from train import loop, runs
from synthface.stage0_checks import background_palette_accuracy, check_export, sample_prompts
from synthface.stage0_phases import (DiffusionPhase, Stage0Data, VAEPhase, check_diffusion_settings,
                                     final_params, fit, latent_scaling_factor, load_data, read_json, read_losses,
                                     text_variants, timestep_weights)

log = logging.getLogger(__name__)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "configs",
                              "synthface_stage0.yaml")  # beside the other stages' configs
PHASES = ("vae", "diffusion")

_PHASE_DEFAULTS = {"batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "final_lr_fraction": 0.1,
                   "weight_decay": 0.0, "clip_grad_norm": 1.0, "ema_decay": None, "log_every": 25,
                   "checkpoint_every": 200}

DEFAULTS: dict[str, Any] = {
    "workdir": "",
    "seed": 0,
    "on_change": "error",  # a workdir holding a run with other settings: "error" or "restart" (clear it)
    "progress_bar": True,
    "devices": 1,  # devices of the mesh (data parallel); 0 = all
    "data": {
        "root": "",  # a SynthFace tree (python -m synthface)
        "resolution": 64,  # images are resized when the tree's size differs
        "heldout_images": 70,  # held-out images for the VAE's PSNR (0 = none)
        "p_empty": 0.1, "p_face_prompt": 0.3, "p_grid_prompt": 0.2,
        "pairs": False,  # also train on the tree's two-person pairs (64×128 images, group captions)
    },
    "model": {"vae": "synthface", "text_encoder": "synthface", "unet": "synthface",
              "vae_overrides": {}, "text_encoder_overrides": {}, "unet_overrides": {}},
    "vae": {**_PHASE_DEFAULTS, "steps": 300, "batch_size": 16, "lr": 2e-3, "crop": 32, "hflip": True,
            "l1_weight": 1.0, "mse_weight": 0.0, "kl_weight": 1e-6, "logvar_init": -9.0},
    "diffusion": {**_PHASE_DEFAULTS, "steps": 1000, "ema_decay": 0.995,
                  "prediction_type": "v_prediction",  # or "epsilon" (see the module docstring)
                  "pair_batch_size": 0,  # two-person images per step beside batch_size portraits (data.pairs)
                  # or "min_snr" / "snr_cap" / "signal_floor" (its floor: weight_floor)
                  "loss_weighting": "uniform", "snr_gamma": 5.0, "weight_floor": 0.25,
                  # > 0: the auxiliary loss that reads the named expression from the text encoder's output
                  # (stage0_phases.ExpressionReadout), this weight × its cross-entropy
                  "text_aux_weight": 0.0},
    "sample": {"count": 8, "steps": 25, "guidance_scale": 4.0, "seed": 0, "models": ""},
}

#: ``--quick``: seconds, for tests and ``make demo --quick`` (a loadable folder; quality irrelevant)
QUICK_OVERRIDES: tuple[str, ...] = (
    "vae.steps=4", "vae.batch_size=4", "vae.warmup_steps=1", "vae.log_every=2", "vae.checkpoint_every=0",
    "diffusion.steps=4", "diffusion.batch_size=4", "diffusion.warmup_steps=1", "diffusion.log_every=2",
    "diffusion.checkpoint_every=0", "diffusion.ema_decay=null", "data.heldout_images=8", "sample.count=0",
)


# =========================================================================================================
# Config
# =========================================================================================================
def stage0_config(overrides: Sequence[str] = (), *, quick: bool = False, path: str | None = DEFAULT_CONFIG):
    """The stage-0 config: :data:`DEFAULTS` ← YAML at ``path`` ← (:data:`QUICK_OVERRIDES` if ``quick``) ←
    ``overrides`` (``key.sub=value``)."""
    from train.config import load_config

    cfg = load_config(path, [*(QUICK_OVERRIDES if quick else ()), *overrides], defaults=DEFAULTS)
    if quick and cfg["diffusion"]["pair_batch_size"]:
        cfg["diffusion"]["pair_batch_size"] = min(int(cfg["diffusion"]["pair_batch_size"]), 2)
    return cfg


def model_configs(cfg: Mapping):
    """``(VAEConfig, CLIPTextConfig, UNetConfig)`` from ``model`` (variant + field overrides), checked against each
    other and against ``data.resolution``."""
    from dynamicid_jax.models.clip import text_config
    from dynamicid_jax.models.unet import UNetConfig, unet_config
    from dynamicid_jax.models.vae import VAEConfig, vae_config, vae_scale_factor

    m = cfg["model"]

    def tuples(d):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d or {}).items()}

    def replaced(base, overrides, what):
        try:
            return dataclasses.replace(base, **tuples(overrides))
        except TypeError as e:
            raise ValueError(f"model.{what}: {e}") from None

    vae = replaced(vae_config(m["vae"]), m.get("vae_overrides"), "vae_overrides").validate()
    text = replaced(text_config(m["text_encoder"]), m.get("text_encoder_overrides"), "text_encoder_overrides")
    unet = replaced(unet_config(m["unet"]), m.get("unet_overrides"), "unet_overrides").validate()
    if not isinstance(vae, VAEConfig) or not isinstance(unet, UNetConfig):
        raise TypeError("model configs")
    if unet.cross_attention_dim != text.hidden_size:
        raise ValueError(f"the UNet's cross_attention_dim ({unet.cross_attention_dim}) must equal the text encoder's "
                         f"hidden_size ({text.hidden_size})")
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise ValueError(f"the UNet's in/out channels ({unet.in_channels}/{unet.out_channels}) must equal the VAE's "
                         f"latent_channels ({vae.latent_channels})")
    res, f = cfg["data"]["resolution"], vae_scale_factor(vae)
    multiple = f * 2 ** (len(unet.block_out_channels) - 1)
    if isinstance(res, bool) or not isinstance(res, int) or res <= 0 or res % multiple:
        raise ValueError(f"data.resolution must be a positive multiple of {multiple} (the VAE's scale factor {f} × "
                         f"the UNet's downsampling {multiple // f}), got {res!r}")
    unet = dataclasses.replace(unet, sample_size=res // f)
    vae = dataclasses.replace(vae, sample_size=res)
    return vae, text, unet


def validate(cfg: Mapping) -> None:
    """Clear errors for settings that cannot work (before any data is read)."""
    if not cfg["data"]["root"]:
        raise ValueError("data.root must name a SynthFace folder (python -m synthface --out DIR "
                         "--identities N)")
    if not cfg["workdir"]:
        raise ValueError("workdir must name the folder for checkpoints and the export")
    vae_cfg, _, _ = model_configs(cfg)
    from dynamicid_jax.models.vae import vae_scale_factor

    f, res = vae_scale_factor(vae_cfg), cfg["data"]["resolution"]
    crop = cfg["vae"]["crop"]
    if not isinstance(crop, int) or crop <= 0 or crop % f or crop > res:
        raise ValueError(f"vae.crop must be a positive multiple of the VAE's scale factor {f} and at most "
                         f"data.resolution={res}, got {crop!r}")
    d = cfg["data"]
    probs = [float(d[k]) for k in ("p_empty", "p_face_prompt", "p_grid_prompt")]
    if min(probs) < 0 or sum(probs) > 1:
        raise ValueError(f"data.p_empty, p_face_prompt, p_grid_prompt must be >= 0 with a sum <= 1, got {probs}")
    for phase in PHASES:
        p = cfg[phase]
        for key in ("steps", "batch_size"):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise ValueError(f"{phase}.{key} must be a positive integer, got {p[key]!r}")
    if cfg["on_change"] not in ("error", "restart"):
        raise ValueError(f"on_change must be 'error' or 'restart', got {cfg['on_change']!r}")
    pair_batch = cfg["diffusion"]["pair_batch_size"]
    if isinstance(pair_batch, bool) or not isinstance(pair_batch, int) or pair_batch < 0:
        raise ValueError(f"diffusion.pair_batch_size must be a non-negative integer, got {pair_batch!r}")
    if not isinstance(d["pairs"], bool):
        raise ValueError(f"data.pairs must be true or false, got {d['pairs']!r}")
    if pair_batch and not d["pairs"]:
        raise ValueError("diffusion.pair_batch_size > 0 needs data.pairs=true")
    check_diffusion_settings(cfg["diffusion"])


def phase_fingerprints(cfg: Mapping, data_index: Mapping) -> dict[str, str]:
    """Per phase, a hash of what decides its result (its settings, the data, and the phase before it); logging,
    checkpoint cadence and sampling settings are left out."""
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def section(name):
        return {k: v for k, v in cfg[name].items() if k not in ("log_every", "checkpoint_every")}

    d, m = cfg["data"], cfg["model"]
    data = {"index": {k: data_index.get(k) for k in ("schema", "seed", "image_size", "splits")},
            "resolution": d["resolution"]}
    if d["pairs"]:
        data["pairs"] = len(data_index.get("pairs", []))
    vae = digest({"data": data, "heldout": d["heldout_images"], "seed": cfg["seed"], "devices": cfg["devices"],
                  "model": [m["vae"], m.get("vae_overrides")], "vae": section("vae")})
    diffusion = digest({"vae": vae, "seed": cfg["seed"], "devices": cfg["devices"],
                        "text": {k: d[k] for k in ("p_empty", "p_face_prompt", "p_grid_prompt")},
                        "model": [m["text_encoder"], m.get("text_encoder_overrides"), m["unet"],
                                  m.get("unet_overrides")], "diffusion": section("diffusion")})
    return {"vae": vae, "diffusion": diffusion}


# =========================================================================================================
# The run
# =========================================================================================================
def _prepare_workdir(cfg: Mapping, data_index: Mapping) -> tuple[str, dict[str, str]]:
    """Create the workdir; a phase folder made with other settings (its ``phase.json``) is an error, or with
    ``on_change=restart`` is removed together with every later phase and the export."""
    workdir = os.path.abspath(cfg["workdir"])
    os.makedirs(workdir, exist_ok=True)
    fps = phase_fingerprints(cfg, data_index)
    stale = False
    for phase in PHASES:
        folder = os.path.join(workdir, phase)
        recorded = (read_json(os.path.join(folder, "phase.json")) or {}).get("fingerprint")
        if not stale and os.path.isdir(folder) and recorded is not None and recorded != fps[phase]:
            if cfg["on_change"] != "restart":
                raise ValueError(f"{folder} was trained with other settings or data (fingerprint {recorded} != "
                                 f"{fps[phase]}); use another workdir or on_change=restart")
            stale = True
        if stale:
            log.info("settings changed: removing %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    metrics = read_json(os.path.join(workdir, "export", "stage0_metrics.json")) or {}
    if stale or metrics.get("fingerprint", fps["diffusion"]) != fps["diffusion"]:
        shutil.rmtree(os.path.join(workdir, "export"), ignore_errors=True)
    write_json({"fingerprints": fps, "config": json.loads(json.dumps(cfg))}, os.path.join(workdir, "run.json"),
                      default=float)
    return workdir, fps


def _start_phase(folder: str, fp: str) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json({"fingerprint": fp}, os.path.join(folder, "phase.json"))


def _save_array(path: str, array: np.ndarray) -> None:
    from dynamicid_jax.file_io import atomic_path

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def run_vae_phase(cfg: Mapping, vae_cfg, data: Stage0Data, workdir: str, fp: str
                  ) -> tuple[Any, Any, np.ndarray, dict]:
    """Train (or resume / reuse) the VAE; returns ``(vae_config with scaling_factor, params, moments, metrics)``."""
    folder = os.path.join(workdir, "vae")
    _start_phase(folder, fp)
    done = read_json(os.path.join(folder, "done.json"))
    params_path, moments_path = os.path.join(folder, "params.safetensors"), os.path.join(folder, "moments.npy")
    pair_path = os.path.join(folder, "pair_moments.npy")
    if done is not None and os.path.exists(params_path) and os.path.exists(moments_path):
        log.info("phase vae: finished before (%d steps), reusing it", done["steps"])
        params = jax.tree_util.tree_map(jnp.asarray, runs.load_params(params_path))
        if data.pair_images is not None and not os.path.exists(pair_path):
            _save_array(pair_path, VAEPhase(cfg, vae_cfg, data).encode_all(params, data.pair_images))
        return (dataclasses.replace(vae_cfg, scaling_factor=done["scaling_factor"]), params,
                np.load(moments_path), {**done, "skipped": True})
    phase = VAEPhase(cfg, vae_cfg, data)
    log.info("phase vae: %d steps, batch %d, crops %d px", cfg["vae"]["steps"], cfg["vae"]["batch_size"],
             cfg["vae"]["crop"])
    initial = phase.initial_params(int(cfg["seed"]))
    state, timing = fit(phase.task(initial), cfg["vae"], cfg, folder)
    start = time.perf_counter()
    params = final_params(state, cfg["vae"]["ema_decay"], initial)
    moments = phase.encode_all(params, data.images)
    scaling = latent_scaling_factor(moments, int(cfg["seed"]))
    psnr = phase.psnr(params, data.heldout)
    psnr_train = phase.psnr(params, data.images[:len(data.heldout)])
    losses = read_losses(folder)
    metrics = {"steps": int(loop.host_value(state.step)), "scaling_factor": scaling,
               "latent_std": 1.0 / scaling, "latent_mean": float(np.mean(moments[..., :moments.shape[-1] // 2])),
               "posterior_std_mean": float(np.mean(np.exp(0.5 * moments[..., moments.shape[-1] // 2:]))),
               "psnr_heldout": psnr, "psnr_train": psnr_train, "heldout_images": int(len(data.heldout)),
               "loss_first": losses[0]["loss"] if losses else None, "loss_last": losses[-1]["loss"] if losses else None,
               "losses": [[r["step"], r["loss"]] for r in losses], **timing,
               "measure_s": time.perf_counter() - start}
    runs.save_params(params, params_path, metadata={"format": "dynamicid-jax/stage0-vae", "scaling_factor":
                                                      str(scaling)})
    _save_array(moments_path, moments)
    if data.pair_images is not None:
        _save_array(pair_path, phase.encode_all(params, data.pair_images))
    metrics["wall_s"] += metrics["measure_s"]
    write_json(metrics, os.path.join(folder, "done.json"), default=float)
    log.info("phase vae: PSNR %.2f dB (held-out), scaling_factor %.4f, %.1f s", psnr or float("nan"), scaling,
             metrics["wall_s"])
    return dataclasses.replace(vae_cfg, scaling_factor=scaling), params, moments, metrics


def run_diffusion_phase(cfg: Mapping, text_cfg, unet_cfg, scheduler, moments, scaling: float, data: Stage0Data,
                        workdir: str, fp: str) -> tuple[Any, dict]:
    """Train (or resume / reuse) text encoder + UNet; returns ``({"text_encoder", "unet"} params, metrics)``."""
    folder = os.path.join(workdir, "diffusion")
    _start_phase(folder, fp)
    done = read_json(os.path.join(folder, "done.json"))
    params_path = os.path.join(folder, "params.safetensors")
    if done is not None and os.path.exists(params_path):
        log.info("phase diffusion: finished before (%d steps), reusing it", done["steps"])
        return jax.tree_util.tree_map(jnp.asarray, runs.load_params(params_path)), {**done, "skipped": True}
    pair_moments = None
    if data.pair_images is not None:
        pair_moments = np.load(os.path.join(workdir, "vae", "pair_moments.npy"))
    phase = DiffusionPhase(cfg, text_cfg, unet_cfg, scheduler, moments, scaling, data, pair_moments)
    p = cfg["diffusion"]
    log.info("phase diffusion: %d steps, batch %d, lr %g, EMA %s", p["steps"], p["batch_size"], p["lr"],
             p["ema_decay"])
    initial = phase.initial_params(int(cfg["seed"]) + 1)
    state, timing = fit(phase.task(initial), p, cfg, folder)
    params = final_params(state, p["ema_decay"], initial)
    losses = read_losses(folder)
    tail = [r["loss"] for r in losses[-max(1, len(losses) // 10):]]
    metrics = {"steps": int(loop.host_value(state.step)), "ema": state.ema is not None,
               "loss_first": losses[0]["loss"] if losses else None, "loss_last": losses[-1]["loss"] if losses else None,
               "loss_tail_mean": float(np.mean(tail)) if tail else None,
               "losses": [[r["step"], r["loss"]] for r in losses], **timing}
    runs.save_params(params, params_path, metadata={"format": "dynamicid-jax/stage0-diffusion"})
    write_json(metrics, os.path.join(folder, "done.json"), default=float)
    log.info("phase diffusion: loss %.4f → %.4f, %.1f s", metrics["loss_first"] or float("nan"),
             metrics["loss_tail_mean"] or float("nan"), metrics["wall_s"])
    return params, metrics


def run_stage0(cfg: Mapping) -> str:
    """Run (resume, or reuse) stage 0 for ``cfg`` (see :func:`stage0_config`); returns the export folder
    ``{workdir}/export/sd``."""
    validate(cfg)
    absl_logger = logging.getLogger("absl")  # Orbax logs every checkpoint step at INFO
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.WARNING))
    try:
        return _run_stage0(cfg)
    finally:
        absl_logger.setLevel(level)


def _run_stage0(cfg: Mapping) -> str:
    from dynamicid_jax.models.clip import CLIPTextModel
    from dynamicid_jax.models.unet import UNet2DConditionModel
    from dynamicid_jax.models.vae import AutoencoderKL
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler
    from dynamicid_jax.tokenizer import load_tokenizer

    total_start = time.perf_counter()
    import synthface

    workdir, fps = _prepare_workdir(cfg, synthface.load_index(cfg["data"]["root"]))
    export_dir = os.path.join(workdir, "export")
    sd_dir, metrics_path = os.path.join(export_dir, "sd"), os.path.join(export_dir, "stage0_metrics.json")
    if os.path.isdir(sd_dir) and os.path.exists(metrics_path):
        log.info("stage 0: export %s exists, nothing to do", sd_dir)
        return sd_dir
    vae_cfg, text_cfg, unet_cfg = model_configs(cfg)
    tokenizer = load_tokenizer()
    start = time.perf_counter()
    data = load_data(cfg, tokenizer)
    load_s = time.perf_counter() - start
    log.info("stage 0: %d training images, %d held-out, %.1f s to load", len(data.images), len(data.heldout), load_s)
    vae_cfg, vae_params, moments, vae_metrics = run_vae_phase(cfg, vae_cfg, data, workdir, fps["vae"])
    scheduler = load_scheduler({**SD15_SCHEDULER_CONFIG, "prediction_type": cfg["diffusion"]["prediction_type"]},
                               kind="ddim")
    diff_params, diff_metrics = run_diffusion_phase(cfg, text_cfg, unet_cfg, scheduler, moments,
                                                    vae_cfg.scaling_factor, data, workdir,
                                                    fps["diffusion"])
    start = time.perf_counter()
    sd = StableDiffusion(UNet2DConditionModel(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg), tokenizer,
                         scheduler, {"unet": diff_params["unet"], "vae": vae_params,
                                     "text_encoder": diff_params["text_encoder"]})
    os.makedirs(export_dir, exist_ok=True)
    if os.path.isdir(sd_dir):  # an export without its metrics file: an interrupted run wrote it; write it again
        shutil.rmtree(sd_dir)
    sd.save_pretrained(sd_dir)
    export_s = time.perf_counter() - start
    metrics = {
        "format": "dynamicid-jax/stage0-metrics-v1", "export": "sd", "fingerprint": fps["diffusion"],
        "data_root": os.path.abspath(cfg["data"]["root"]), "train_images": int(len(data.images)),
        "train_pairs": 0 if data.pair_images is None else int(len(data.pair_images)),
        "resolution": int(cfg["data"]["resolution"]), "vae_scale_factor": sd.vae_scale_factor,
        "latent_shape": [int(x) for x in moments.shape[1:-1]] + [vae_cfg.latent_channels],
        "scaling_factor": vae_cfg.scaling_factor,
        "params": {k: int(sum(np.size(x) for x in jax.tree_util.tree_leaves(v))) for k, v in sd.params.items()},
        "vae": vae_metrics, "diffusion": diff_metrics, "load_s": load_s, "export_s": export_s,
        "config": json.loads(json.dumps(cfg))}
    if int(cfg["sample"]["count"]) > 0:
        start = time.perf_counter()
        metrics["samples"] = check_export(sd_dir, cfg, os.path.join(export_dir, "samples.png"))
        metrics["samples"]["wall_s"] = time.perf_counter() - start
    metrics["wall_s_this_run"] = time.perf_counter() - total_start
    write_json(metrics, metrics_path, default=float)
    log.info("stage 0: exported %s (%.1f s this run)", sd_dir, metrics["wall_s_this_run"])
    return sd_dir


def run(config: str | None = DEFAULT_CONFIG, overrides: Sequence[str] = (), *, workdir: str | None = None,
        quick: bool = False) -> str:
    """:func:`run_stage0` of :func:`stage0_config` ``(overrides, quick=quick, path=config)``; ``workdir``
    overrides the config's (as the other stages' ``run``)."""
    extra = [f"workdir={workdir}"] if workdir else []
    return run_stage0(stage0_config([*overrides, *extra], quick=quick, path=config))


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML experiment config (train/configs/)")
    p.add_argument("--workdir", default=None, help="checkpoints / export folder (overrides the config's workdir)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run (tests): " + " ".join(QUICK_OVERRIDES))
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = p.parse_args(argv)
    runs.setup_logging()
    overrides = list(args.overrides) + ([f"workdir={args.workdir}"] if args.workdir else [])
    try:
        cfg = stage0_config(overrides, quick=args.quick, path=args.config)
        validate(cfg)
    except ValueError as e:
        raise SystemExit(f"stage0: {e}") from None
    print(run_stage0(cfg))
    return 0


__all__ = ["DEFAULTS", "DEFAULT_CONFIG", "QUICK_OVERRIDES", "DiffusionPhase", "Stage0Data", "VAEPhase",
           "background_palette_accuracy", "check_export", "phase_fingerprints", "latent_scaling_factor", "load_data",
           "main", "model_configs", "read_losses", "run", "run_stage0", "sample_prompts", "stage0_config",
           "text_variants", "timestep_weights", "validate"]

if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
