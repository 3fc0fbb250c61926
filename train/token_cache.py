"""Stage 2's target-token cache: the stage-1 ID encoder's tokens for every record of the face shards.

    python -m train.token_cache --config train/configs/stage2_sd15.yaml [key.sub=value ...]
    folder = train.token_cache.run(cfg)          # in-process (train.stage2.run calls it when needed)

Reads ``model.stage1`` (the stage-1 export: ``id_encoder/…``, whose metadata names the ID encoder config and
the CLIP vision folder), ``model.image_encoder`` (overrides that folder; only used when the shards hold CLIP
pixels rather than CLIP features) and ``data.shards``; writes ``token_cache.path`` (a folder; default
``{workdir}/token_cache``): one
``tokens.p{i}-of-{n}.safetensors`` per process with ``index int64 [n]`` (global record indices) and ``tokens
float32 [n, 4, C]``. Every process encodes its share (``data_pipelines.loaders.record_loader``); the part
files are written atomically, so a crashed run leaves no half file; ``cache.json`` (written last) holds the
fingerprint of the inputs (stage-1 export, shards, image encoder), and :func:`run` skips a cache whose fingerprint
matches. :class:`TokenCache` joins the parts; :class:`TokenLookup` is the Grain map that attaches
``src_tokens`` / ``tgt_tokens`` to stage-2 elements.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train import runs
from train.config import loader_config, stage_defaults

log = logging.getLogger(__name__)

_PART = re.compile(r"tokens\.p(\d+)-of-(\d+)\.safetensors$")


class TokenCache:
    """Dense ``tokens [N, 4, C]`` by global record index, with a ``present`` mask for skipped records."""

    def __init__(self, tokens: np.ndarray, present: np.ndarray):
        self.tokens, self.present = tokens, present

    @classmethod
    def load(cls, folder: str) -> "TokenCache":
        from dynamicid_jax.weights.keymap import read_safetensors

        parts = sorted(glob.glob(os.path.join(folder, "tokens.p*-of-*.safetensors")))
        if not parts:
            raise FileNotFoundError(f"no token-cache parts (tokens.p*-of-*.safetensors) in {folder!r}; build them "
                                    f"with python -m train.token_cache")
        counts = {int(_PART.search(p).group(2)) for p in parts}
        if len(counts) != 1 or len(parts) != counts.pop():
            names = [os.path.basename(p) for p in parts]
            raise ValueError(f"token cache {folder!r} is incomplete or mixes runs: {names}")
        loaded = [read_safetensors(p) for p in parts]
        size = 1 + max(int(d["index"].max()) for d in loaded if d["index"].size)
        shape = next(d["tokens"].shape[1:] for d in loaded if d["tokens"].size)
        tokens = np.zeros((size,) + shape, np.float32)
        present = np.zeros((size,), bool)
        for d in loaded:
            tokens[d["index"]] = d["tokens"]
            present[d["index"]] = True
        return cls(tokens, present)

    def lookup(self, index: np.ndarray, what: str) -> np.ndarray:
        index = np.asarray(index, np.int64)
        if index.size and (index.max() >= len(self.present) or not self.present[index].all()):
            missing = sorted(set(index.reshape(-1).tolist()) - set(np.flatnonzero(self.present).tolist()))[:5]
            raise KeyError(f"{what}: records {missing} are not in the token cache (rebuild it for these shards)")
        return self.tokens[index]


class TokenLookup:
    """Grain ``map``: adds ``src_tokens`` (from ``src_index``) and ``tgt_tokens`` (from ``tgt_index``)."""

    def __init__(self, cache: TokenCache):
        self.cache = cache

    def __call__(self, element: Mapping) -> dict:
        out = dict(element)
        out["src_tokens"] = self.cache.lookup(element["src_index"], "src_index")
        out["tgt_tokens"] = self.cache.lookup(element["tgt_index"], "tgt_index")
        return out


def build_token_cache(batches: Iterable[Mapping], encode: Callable[[dict], np.ndarray], folder: str, *,
                      batch_size: int, process_index: int = 0, process_count: int = 1,
                      metadata: dict[str, str] | None = None) -> str:
    """Encode every batch (``index``, ``ref_id_embedding``, ``ref_clip_*``) and write this process's part.

    Short batches are padded to ``batch_size`` (one compiled shape) and the padding dropped again."""
    from dynamicid_jax.weights.keymap import write_safetensors

    indices, tokens = [], []
    for batch in batches:
        n = len(batch["index"])
        padded = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], batch_size - n, 0)])
                  if n < batch_size else np.asarray(v) for k, v in batch.items() if k != "identity"}
        tokens.append(np.asarray(encode(padded), np.float32)[:n])
        indices.append(np.asarray(batch["index"], np.int64))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"tokens.p{process_index}-of-{process_count}.safetensors")
    idx = np.concatenate(indices) if indices else np.zeros((0,), np.int64)
    tok = np.concatenate(tokens) if tokens else np.zeros((0, 0, 0), np.float32)
    write_safetensors({"index": idx, "tokens": tok}, path, metadata=metadata)
    return path


def stage1_id_encoder_config(cfg, meta: Mapping[str, str]):
    """The stage-1 ID encoder's config: from the export's metadata, else ``model.id_encoder_*`` of ``cfg``."""
    from dynamicid_jax.methods import id_encoder as ide

    if meta.get("id_encoder_config"):
        return ide.IDEncoderConfig.from_dict(json.loads(meta["id_encoder_config"]))
    m = cfg["model"]
    return ide.id_encoder_config(m["id_encoder_variant"], **dict(m.get("id_encoder_overrides") or {}))


def stage1_image_encoder(cfg, meta: Mapping[str, str]) -> str:
    """The CLIP vision spec: ``model.image_encoder`` if set, else the one the stage-1 export names."""
    return cfg["model"].get("image_encoder") or meta.get("image_encoder", "")


def require_stage1(path: str) -> dict[str, str]:
    """The stage-1 export's metadata; a clear error when the export does not exist."""
    from train.runs import export_metadata

    if not path:
        raise ValueError("model.stage1 must name the stage-1 export (W1/export/stage1.safetensors, written by "
                         "python -m train.stage1)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.stage1={path!r} does not exist: run stage 1 first (python -m train.stage1 "
                                f"... workdir=W1 writes W1/export/stage1.safetensors)")
    return export_metadata(path)


def make_encoder(cfg, stage1_params: dict | None = None, image_encoder: tuple | None = None,
                 id_encoder_config=None):
    """``encode(batch) -> tokens [B, 4, C]`` with the stage-1 ID encoder (jitted, fp32). The encoder config and
    CLIP vision tower default to what the stage-1 export's metadata names (:func:`stage1_id_encoder_config`)."""
    from dynamicid_jax.methods import id_encoder as ide

    m = cfg["model"]
    need = stage1_params is None or id_encoder_config is None or image_encoder is None
    meta = require_stage1(m["stage1"]) if need and (m["stage1"] or stage1_params is None) else {}
    enc_cfg = id_encoder_config if id_encoder_config is not None else stage1_id_encoder_config(cfg, meta)
    module = ide.IDEncoder(enc_cfg)
    params = (stage1_params if stage1_params is not None else runs.load_params(m["stage1"]))["id_encoder"]
    runs.check_tree(params, ide.abstract_params(module), "stage-1 ID encoder params")
    image_module, image_params, _ = image_encoder if image_encoder is not None else runs.load_image_encoder(
        stage1_image_encoder(cfg, meta), jnp.float32)

    @jax.jit
    def encode_features(p, embeds, feats):
        return module.apply({"params": p}, embeds, feats)

    @jax.jit
    def encode_pixels(p, ip, embeds, pixels):
        return module.apply({"params": p}, embeds, runs.clip_penultimate(image_module, ip, pixels))

    def encode(batch):
        embeds = jnp.asarray(batch["ref_id_embedding"], jnp.float32)
        if "ref_clip_features" in batch:
            return encode_features(params, embeds, jnp.asarray(batch["ref_clip_features"], jnp.float32))
        if image_module is None:
            raise ValueError("the shards hold CLIP pixels: set model.image_encoder to the CLIP-H folder")
        return encode_pixels(params, image_params, embeds, jnp.asarray(batch["ref_clip_pixels"], jnp.float32))

    return encode


CACHE_RECORD = "cache.json"


def cache_folder(cfg, workdir: str | None = None) -> str:
    """``token_cache.path``, or ``{workdir}/token_cache`` when it is empty."""
    path = cfg["token_cache"]["path"]
    if path:
        return os.path.abspath(path)
    from train.runs import workdir_of

    try:
        return os.path.join(workdir_of(cfg, workdir), "token_cache")
    except ValueError:
        raise ValueError("set token_cache.path (or a workdir, whose token_cache/ then holds the cache)") from None


def run(config: Any = None, overrides: Sequence[str] = (), *, workdir: str | None = None,
        image_encoder: tuple | None = None) -> str:
    """Build (or reuse) the token cache for a stage-2 config → its folder (module docstring).

    ``image_encoder``: the already loaded ``(module, params, spec)`` of the CLIP tower the export names."""
    from data_pipelines import loaders
    from train import loop
    from train.runs import check_shards, load, run_fingerprint
    from train.stage1 import resolve_clip_size

    cfg = load(config, overrides, defaults=stage_defaults("stage2"))
    d, m, tc = cfg["data"], cfg["model"], cfg["token_cache"]
    meta = require_stage1(m["stage1"])
    enc_cfg = stage1_id_encoder_config(cfg, meta)
    check_shards(d["shards"], enc_cfg.id_embed_dim)
    folder = cache_folder(cfg, workdir)
    spec = stage1_image_encoder(cfg, meta)
    fp, _ = run_fingerprint({"id_encoder": enc_cfg.to_dict(), "latents": d["latents"], "clip": d["clip"],
                             "clip_size": d["clip_size"], "tokenizer": d["tokenizer"]},
                            {"stage1": m["stage1"], "shards": d["shards"], "image_encoder": spec})
    record = os.path.join(folder, CACHE_RECORD)
    if os.path.isfile(record):
        with open(record) as f:
            if json.load(f).get("fingerprint") == fp:
                TokenCache.load(folder)  # complete?
                log.info("token cache %s is up to date", folder)
                return folder
    if jax.process_index() == 0:
        for old in glob.glob(os.path.join(folder, "tokens.p*-of-*.safetensors")) + [record]:
            if os.path.exists(old):
                os.remove(old)
    loop.barrier("token_cache_cleared")
    if image_encoder is None:
        image_encoder = runs.load_image_encoder(spec, jnp.float32)
    conf = loader_config(loaders.LoaderConfig, {**d, "clip_size": resolve_clip_size(d, image_encoder[0])})
    batches = loaders.record_loader(d["shards"], int(tc["batch_size"]), conf)
    encode = make_encoder(cfg, image_encoder=image_encoder, id_encoder_config=enc_cfg)
    path = build_token_cache(iter(batches), encode, folder, batch_size=int(tc["batch_size"]),
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             metadata={"fingerprint": fp})
    log.info("wrote %s", path)
    loop.barrier("token_cache_written")
    if jax.process_index() == 0:
        from dynamicid_jax.file_io import write_json

        write_json({"fingerprint": fp, "stage1": os.path.abspath(m["stage1"]),
                    "shards": os.path.abspath(d["shards"])}, record)
    return folder


def main(argv=None) -> int:
    return runs.stage_main(__doc__, run, argv)


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
