"""Training runs: one skeleton for every training stage (:func:`run_stage`) and the bookkeeping it rests on.

A run records a fingerprint of the settings and inputs that decide its result in ``{workdir}/run.json``. A rerun
with the same fingerprint resumes from the last checkpoint, or returns the export at once when it is already at
``train.steps``; a different fingerprint is an error unless ``on_change=restart`` (which discards the old
checkpoints). ``train.steps`` and the ``optimizer`` may change between runs (resume). A run that failed before its
first checkpoint leaves nothing worth keeping, so a corrected rerun takes its workdir over.

The models a stage builds on are loaded here too: the frozen base (:func:`load_base` → :class:`BaseModel`) and image
encoder, compute dtypes, abstract (boxed, logical-axis) param trees for shardings, and the trainable params' files
between stages (:func:`save_params` / :func:`load_params`, checked with :func:`check_tree`).

Stage 1, stage 2 and Infinite-ID fill a :class:`StageRun` in (what decides the fingerprint, the embedding width
the shards must have, how to train and export) and call :func:`run_stage`. The token cache is not a training
stage (no trainer, no checkpoints; its folder holds its own record) but shares :func:`load`,
:func:`check_shards` and :func:`run_fingerprint`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from train import loop

log = logging.getLogger(__name__)

__all__ = ["StageRun", "run_stage", "RunMismatchError", "load", "run_fingerprint", "path_signature",
           "claim_workdir", "export_metadata", "finished", "export_finished", "quiet_logs", "workdir_of",
           "check_shards", "RUN_VOLATILE", "OWNED", "stage_main", "cli_args", "init_distributed",
           "setup_logging", "DTYPES", "BaseModel", "boxed_abstract", "check_tree", "clip_penultimate", "compute_dtype",
           "load_base", "load_image_encoder", "load_params", "save_params"]

#: the workdir entries a run owns (discarded by ``on_change=restart``)
OWNED = ("checkpoints", "export", "tb", "samples")


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What a training stage fills into :func:`run_stage`.

    ``export``: the export's path inside the workdir; ``embed_dim(cfg)``: the face-embedding width the shards must
    hold (``None``: any); ``inputs(cfg)``: the input paths whose contents the fingerprint covers;
    ``train(cfg, workdir, fingerprint)``: train (resuming from the workdir's checkpoints) and export → the export's
    path; ``done(path, fingerprint, steps)``: whether the export is this run's, finished (default: the export's
    safetensors metadata, :func:`export_finished`)."""

    name: str
    defaults: Mapping[str, Any]
    export: str
    embed_dim: Callable[[Any], int | None]
    inputs: Callable[[Any], dict[str, str]]
    train: Callable[[Any, str, str], str]
    done: Callable[[str, str, int], bool] | None = None
    owned: tuple[str, ...] = OWNED


def run_stage(stage: StageRun, config: Any = None, overrides: Sequence[str] = (), *,
              workdir: str | None = None) -> str:
    """Load the config (``config`` a YAML path, a mapping or ``None`` over ``stage.defaults``, then the
    ``key.sub=value`` ``overrides``), check the shards, fingerprint the run, return the export at once when this
    run already finished it, else claim the workdir and train → the export's path."""
    quiet_logs()
    cfg = load(config, overrides, defaults=stage.defaults)
    workdir = workdir_of(cfg, workdir)
    check_shards(cfg["data"]["shards"], stage.embed_dim(cfg))
    fingerprint, settings = run_fingerprint(cfg, stage.inputs(cfg))
    path = os.path.join(workdir, stage.export)
    steps = int(cfg["train"]["steps"])
    if (stage.done or export_finished)(path, fingerprint, steps):
        log.info("%s in %s is finished (step %s): %s", stage.name, workdir, steps, path)
        return path
    claim_workdir(workdir, fingerprint, settings, cfg["on_change"], owned=stage.owned)
    out = stage.train(cfg, workdir, fingerprint)
    log.info("%s: exported to %s", stage.name, out)
    return out


def export_finished(path: str, fingerprint: str, steps: int) -> bool:
    """Whether the ``.safetensors`` export at ``path`` is this very run's (``fingerprint``) at ``steps``."""
    return finished(export_metadata(path), fingerprint, steps)


#: config entries that do not change what a run computes (or may change on resume): left out of fingerprints
RUN_VOLATILE: dict[str, Any] = {
    "workdir": None, "on_change": None, "checkpoint": None, "optimizer": None, "mesh": None, "sample": None,
    "train": ("steps", "log_every", "sample_every", "progress_bar"),
    "data": ("worker_count", "read_threads", "max_corrupt_fraction", "corrupt_grace"),
    "token_cache": ("batch_size",),
}


class RunMismatchError(RuntimeError):
    """The workdir holds a run with other settings or inputs."""


def load(config: Any, overrides: Sequence[str], defaults: Mapping) -> Any:
    """A stage config: ``config`` is a YAML path, a mapping (merged over ``defaults``) or ``None`` (defaults),
    then ``key.sub=value`` ``overrides``."""
    from train.config import config_from_dict, load_config

    if isinstance(config, Mapping):
        base = config_from_dict(config, defaults=defaults)
        return load_config(None, list(overrides), defaults=base)
    return load_config(config, list(overrides), defaults=defaults)


def path_signature(path: str) -> Any:
    """What identifies the contents of an input path cheaply: sizes and modification times of its files
    (``random:…`` specs and empty strings stand for themselves)."""
    if not path or str(path).startswith("random:") or not os.path.exists(path):
        return path
    if os.path.isfile(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
            if len(out) > 10000:
                return out
    return out


def run_fingerprint(cfg: Mapping, inputs: Mapping[str, str]) -> tuple[str, dict]:
    """``(fingerprint, settings)``: the config without :data:`RUN_VOLATILE` entries plus the signatures of the
    ``inputs`` paths."""
    settings = json.loads(json.dumps(cfg, default=str))
    for key, sub in RUN_VOLATILE.items():
        if sub is None:
            settings.pop(key, None)
        elif isinstance(settings.get(key), dict):
            for k in sub:
                settings[key].pop(k, None)
    settings["inputs"] = {k: path_signature(v) for k, v in sorted(inputs.items())}
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], settings


def _flat_settings(d: Any, where: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat_settings(v, f"{where}.{k}" if where else str(k)))
        return out
    return {where: d}


def claim_workdir(workdir: str, fingerprint: str, settings: dict, on_change: str,
                  owned: Sequence[str] = ("checkpoints", "export", "tb", "samples")) -> None:
    """Check ``{workdir}/run.json`` against this run (see the module docstring) and write it."""
    if on_change not in ("error", "restart"):
        raise ValueError(f"on_change must be 'error' or 'restart', got {on_change!r}")
    record = os.path.join(workdir, "run.json")
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
        trained = any(os.path.isdir(os.path.join(workdir, name)) and os.listdir(os.path.join(workdir, name))
                      for name in ("checkpoints", "export"))
        if old.get("fingerprint") != fingerprint and not trained:
            # an earlier run failed before its first checkpoint (a bad path, a config error found while building
            # the model): nothing of it is worth keeping, so the corrected rerun takes the workdir over
            log.info("%s: the earlier run left no checkpoint; starting with the new settings", workdir)
        elif old.get("fingerprint") != fingerprint:
            a, b = _flat_settings(old.get("settings", {})), _flat_settings(settings)
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if on_change == "error":
                raise RunMismatchError(
                    f"{workdir} holds a run with other settings or inputs (changed: {changed[:8]}); use a new "
                    f"workdir, or set on_change=restart to discard its checkpoints")
            log.warning("%s: settings or inputs changed (%s), discarding the old run", workdir, changed[:8])
            if jax.process_index() == 0:
                for name in owned:
                    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    if jax.process_index() == 0:  # one writer (the workdir may be shared by every process)
        os.makedirs(workdir, exist_ok=True)
        from dynamicid_jax.file_io import write_json

        write_json({"fingerprint": fingerprint, "settings": settings}, record, sort_keys=True)
    loop.barrier("claim_workdir")


def export_metadata(path: str) -> dict[str, str]:
    """The string metadata of a stage export (``.safetensors``); ``{}`` when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})


def finished(meta: Mapping[str, str], fingerprint: str, steps: int) -> bool:
    """Whether an export (its metadata) is the result of this very run at ``steps``."""
    return bool(meta) and meta.get("fingerprint") == fingerprint and meta.get("step") == str(int(steps))


def quiet_logs() -> None:
    """Keep the checkpointer's per-file INFO lines out of the training log."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def workdir_of(cfg: Mapping, workdir: str | None) -> str:
    workdir = workdir or cfg["workdir"]
    if not workdir:
        raise ValueError("give a workdir (workdir=... in the config, --workdir, or run(..., workdir=...))")
    return os.path.abspath(workdir)


def check_shards(shards: str, embed_dim: int | None = None, what: str = "data.shards"):
    """Open the face shards (clear errors for a missing folder, no records, a wrong embedding width)."""
    from data_pipelines.shards import open_shards

    if not shards:
        raise ValueError(f"{what} must name a folder of face shards (python -m data_pipelines.build_shards)")
    data = open_shards(shards)
    if len(data) == 0 or not any(e.records for e in data.manifest.identities):
        raise ValueError(f"{what}={shards!r} holds no face records (the build skipped every image: "
                         f"{dict(data.manifest.skipped) or 'no images found'})")
    if embed_dim is not None and data.manifest.embedding_dim != embed_dim:
        raise ValueError(f"{what}={shards!r} holds {data.manifest.embedding_dim}-d face embeddings but the ID encoder "
                         f"takes {embed_dim}-d ones (set model.id_encoder_overrides.id_embed_dim, or build the shards "
                         f"with the matching face analyzer)")
    return data


# ---------------------------------------------------------------------------------------------------------
# The stage CLIs (python -m train.stage1 --config FILE [overrides])
# ---------------------------------------------------------------------------------------------------------
def cli_args(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML experiment config (train/configs/)")
    p.add_argument("--workdir", default=None, help="checkpoints / logs folder (overrides the config's workdir)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (GPU clusters; TPU finds it)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with no arguments (TPU pods, Slurm, Open MPI)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return p.parse_args(argv)


def init_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` before any JAX computation, when asked to."""
    if args.coordinator or args.num_processes or args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")


def stage_main(doc: str, run: Callable, argv=None) -> int:
    """The ``main`` of a stage CLI (``python -m train.stage1 --config FILE [overrides]``): parse, start the
    distributed runtime when asked, set up logging, ``run(config, overrides, workdir=...)``."""
    args = cli_args(doc.split("\n\n")[0], argv)
    init_distributed(args)
    setup_logging()
    for name in ("absl", "orbax"):  # the checkpointer's per-file INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    run(args.config, args.overrides, workdir=args.workdir)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The models a stage builds on
# ---------------------------------------------------------------------------------------------------------
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def boxed_abstract(module: nn.Module, *args: Any, collection: str = "params", **kwargs: Any) -> Any:
    """``jax.eval_shape(module.init)`` — the boxed (logical axes) abstract tree of one collection."""
    return jax.eval_shape(lambda r: module.init(r, *args, **kwargs), jax.random.key(0)).get(collection, {})


@dataclasses.dataclass
class BaseModel:
    """The frozen Stable Diffusion parts of a stage: modules, params and facts the losses need."""

    unet_config: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    params: dict  # {"unet", "vae", "text_encoder"} (+ "text_encoder_2" for SDXL)
    scaling_factor: float
    source: str
    text_encoder_2: Any = None  # SDXL only: the CLIPTextModelWithProjection

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_conditioning(self, params: Mapping, ids: jax.Array,
                          ids_2: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """``(context [B, 77, D], pooled [B, P] or None)`` of token ids. SDXL: ``ids_2`` are tokenizer 2's; without
        them they are derived from tokenizer 1's (exact unless a prompt contains "!": see ``tokenizer_2_ids``).
        ``params`` holds the text encoders' params under their component names."""
        if not self.is_sdxl:
            return self.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state, None
        from dynamicid_jax.pipelines.stable_diffusion_xl import encode_sdxl_text

        return encode_sdxl_text(self.text_encoder, self.text_encoder_2, params, ids, ids_2)

    def added_cond(self, pooled: jax.Array | None, latent_hw: tuple[int, int]) -> tuple:
        """The UNet's extra positional argument: ``()`` for SD1.x, ``(added_cond,)`` for SDXL (pooled text and
        the micro-conditioning of an uncropped image at the latent's size)."""
        if not self.is_sdxl:
            return ()
        from dynamicid_jax.models.unet import micro_conditioning
        from dynamicid_jax.models.vae import vae_scale_factor

        return ({"text_embeds": pooled, "time_ids": micro_conditioning(pooled.shape[0], latent_hw,
                                                                       vae_scale_factor(self.vae.config))},)


def load_base(path: str, dtype) -> BaseModel:
    """SD1.5 or SDXL (picked from the folder / file) from a diffusers folder or a single ``.safetensors`` file
    (params fp32, modules at ``dtype``; DDIM scheduler)."""
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
    from dynamicid_jax.weights.keymap import is_sdxl

    if not path:
        raise ValueError("model.base must name a Stable Diffusion 1.5 or SDXL diffusers folder or .safetensors file")
    if is_sdxl(path):
        xl = StableDiffusionXL.from_pretrained(path, dtype=dtype, scheduler="ddim")
        return BaseModel(unet_config=xl.unet.config, vae=xl.vae, text_encoder=xl.text_encoder,
                         tokenizer=xl.tokenizer, scheduler=xl.scheduler, params=dict(xl.params),
                         scaling_factor=float(xl.vae.config.scaling_factor), source=os.path.abspath(path),
                         text_encoder_2=xl.text_encoder_2)
    sd = StableDiffusion.from_pretrained(path, dtype=dtype)
    return BaseModel(unet_config=sd.unet.config, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                     scheduler=sd.scheduler, params=dict(sd.params), scaling_factor=float(sd.vae.config.scaling_factor),
                     source=os.path.abspath(path))


def load_image_encoder(spec: str, dtype, seed: int = 0):
    """``(module, params, source)`` for a CLIP vision folder, or ``"random:<variant>"`` (random weights: tests,
    SynthFace); ``""`` → ``(None, None, "")``."""
    from dynamicid_jax.models import clip

    if not spec:
        return None, None, ""
    if spec.startswith("random:"):
        module = clip.CLIPVisionModelWithProjection(clip.vision_config(spec.split(":", 1)[1]), dtype=dtype)
        size = module.config.image_size
        params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed + 7), jnp.zeros((1, size, size, 3)))
                               )["params"]
        return module, params, spec
    module, params = clip.load_image_encoder(spec, dtype=dtype)
    return module, params, os.path.abspath(spec)


def clip_penultimate(module, params, pixels: jax.Array) -> jax.Array:
    """CLIP vision penultimate hidden states ``[B, L, C]`` (the ID encoder's input)."""
    return module.apply({"params": params}, pixels).hidden_states[-2]


# ---------------------------------------------------------------------------------------------------------
# Trainable params on disk (between stages): flat safetensors with "/"-joined Flax paths
# ---------------------------------------------------------------------------------------------------------
def save_params(params: Mapping, path: str, metadata: dict[str, str] | None = None) -> str:
    from dynamicid_jax.weights.keymap import write_safetensors

    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
        jax.device_get(dict(params))).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(flat, path, metadata=metadata)
    return path


def load_params(path: str) -> dict:
    from dynamicid_jax.weights.keymap import read_safetensors

    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in read_safetensors(path).items()})


def check_tree(params: Mapping, abstract: Any, what: str) -> None:
    """``params`` must have exactly the paths and shapes of ``abstract`` (boxed or not)."""
    from dynamicid_jax.sharding import _unbox

    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(_unbox(dict(abstract))).items()}
    have = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or bad:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes "
                         f"{[(k, have[k], want[k]) for k in bad[:5]]}")
