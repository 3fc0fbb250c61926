"""Stage 2's target-token cache: the stage-1 ID encoder's tokens for every record of the face shards.

    python -m train.token_cache --config train/configs/stage2_sd15.yaml [key.sub=value ...]

Reads ``model.stage1`` (the stage-1 export: ``id_encoder/…``), ``model.image_encoder`` (only when the shards
hold CLIP pixels rather than CLIP features) and ``data.shards``; writes ``token_cache.path`` (a folder): one
``tokens.p{i}-of-{n}.safetensors`` per process with ``index int64 [n]`` (global record indices) and ``tokens
float32 [n, 4, C]``. Every process encodes its share (``data_pipelines.loaders.record_loader``); the part
files are written atomically, so a crashed run leaves no half file. :class:`TokenCache` joins the parts;
:class:`TokenLookup` is the Grain map that attaches ``src_tokens`` / ``tgt_tokens`` to stage-2 elements.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import sys
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train import common

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
                      batch_size: int, process_index: int = 0, process_count: int = 1) -> str:
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
    write_safetensors({"index": idx, "tokens": tok}, path)
    return path


def make_encoder(cfg, stage1_params: dict | None = None, image_encoder: tuple | None = None):
    """``encode(batch) -> tokens [B, 4, C]`` with the stage-1 ID encoder (jitted, fp32)."""
    from dynamicid_jax.methods import id_encoder as ide

    m = cfg["model"]
    module = ide.IDEncoder(ide.id_encoder_config(m["id_encoder_variant"], **dict(m.get("id_encoder_overrides") or {})))
    params = (stage1_params if stage1_params is not None else common.load_params(m["stage1"]))["id_encoder"]
    common.check_tree(params, ide.abstract_params(module), "stage-1 ID encoder params")
    image_module, image_params, _ = image_encoder if image_encoder is not None else common.load_image_encoder(
        m.get("image_encoder", ""), jnp.float32)

    @jax.jit
    def encode_features(p, embeds, feats):
        return module.apply({"params": p}, embeds, feats)

    @jax.jit
    def encode_pixels(p, ip, embeds, pixels):
        return module.apply({"params": p}, embeds, common.clip_penultimate(image_module, ip, pixels))

    def encode(batch):
        embeds = jnp.asarray(batch["ref_id_embedding"], jnp.float32)
        if "ref_clip_features" in batch:
            return encode_features(params, embeds, jnp.asarray(batch["ref_clip_features"], jnp.float32))
        if image_module is None:
            raise ValueError("the shards hold CLIP pixels: set model.image_encoder to the CLIP-H folder")
        return encode_pixels(params, image_params, embeds, jnp.asarray(batch["ref_clip_pixels"], jnp.float32))

    return encode


def main(argv=None) -> int:
    args = common.cli_args(__doc__.split("\n\n")[0], argv)
    common.init_distributed(args)
    common.setup_logging()
    from data_pipelines import loaders
    from train.config import load_config
    from train.stage2 import DEFAULTS

    cfg = load_config(args.config, args.overrides, defaults=DEFAULTS)
    d, tc = cfg["data"], cfg["token_cache"]
    if not (d["shards"] and tc["path"] and cfg["model"]["stage1"]):
        raise SystemExit("set data.shards, token_cache.path and model.stage1")
    conf = common.loader_config(loaders.LoaderConfig, d)
    batches = loaders.record_loader(d["shards"], int(tc["batch_size"]), conf)
    path = build_token_cache(iter(batches), make_encoder(cfg), tc["path"], batch_size=int(tc["batch_size"]),
                             process_index=jax.process_index(), process_count=jax.process_count())
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
