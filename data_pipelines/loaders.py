"""Grain loaders for DynamicID's two training stages (the batch contract is in :mod:`data_pipelines.schema`).

Pipeline (Grain's dataset API)::

    MapDataset.range(N).seed(seed).shuffle().repeat(num_epochs)   # global order, reshuffled every epoch
      .random_map(make_example)                                   # rng from (seed, global position)
      [process_index::process_count]                              # per-process share (jax.process_*)
      .to_iter_dataset(ReadOptions(...)) [.mp_prefetch(...)]      # threads / worker processes
      → skip corrupt examples (counted), batch (stage 1)

* **Deterministic**: an example depends only on the seed and its global position, so for a seed the stream is
  fixed, and process ``p`` of ``P`` receives exactly global elements ``p, p+P, p+2P, …`` (before batching).
* **Per-process sharding**: ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
  ``jax.process_count()`` (what ``grain.sharding.ShardByJaxProcess`` reads). Every epoch is a fresh global
  permutation split across processes, so every record is used once per epoch. For multi-host training prefer
  ``num_epochs=None`` (endless): a finite run can end with unequal batch counts if corrupt records are skipped.
* **Checkpointable**: ``it = iter(loader)``; ``it.get_state()`` / ``it.set_state()`` (JSON-able, includes the
  corrupt-record counters); with Orbax: ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``,
  e.g. as one item of ``ocp.args.Composite``.
* **Corrupt records** (undecodable record or image bytes, bad fields, unknown schema version): the example is
  skipped and counted (``it.stats``); once ``skipped > max_corrupt_fraction · max(seen, corrupt_grace)`` the
  iterator raises :class:`CorruptDataError`. ``max_corrupt_fraction=0`` makes the first one an error.
* **Worker processes** (``worker_count > 0``, Grain's ``mp_prefetch``): the workers are spawned processes, so the
  program must create and iterate the loader under ``if __name__ == "__main__":``, and Grain reads absl flags in
  the workers — call ``absl.flags.FLAGS.mark_as_parsed()`` (or run under ``absl.app.run``) first. Tests use
  ``worker_count=0`` (decoding in ``read_threads`` threads of the main process). The output does not depend on
  ``worker_count``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import threading

import grain
import numpy as np

from dynamicid_jax.errors import DynamicIDError
from dynamicid_jax.faces.kdef_grid import grid_face_prompt

from .schema import (
    CorruptRecordError,
    FaceRecord,
    RecordError,
    box_in_center_crop,
    decode_record,
    resize_center_crop,
    to_signed_unit,
)
from .shards import FaceDataset, open_shards

__all__ = [
    "LoaderConfig", "Stage1Config", "Stage2Config", "CorruptDataError", "resolve_inputs", "stage1_loader",
    "stage2_loader", "record_loader", "tokenize_cached",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Options shared by both stages.

    Attributes:
      seed: the data seed (order and every random choice).
      resolution: target image size (shortest side resized, centre crop; docs/method.md §6.1: 512).
      latents: ``"auto"`` (precomputed VAE moments when the shards have them at ``resolution``), ``"precomputed"``
        (required) or ``"pixels"``.
      clip: ``"auto"`` / ``"precomputed"`` / ``"pixels"`` for the reference's CLIP input.
      clip_size: CLIP input size (224 for CLIP-H).
      tokenizer: tokenizer folder; ``None`` = the offline SD1.5 tokenizer.
      num_epochs: ``None`` = endless.
      shuffle: global shuffle (reshuffled each epoch).
      process_index / process_count: this process's share; default ``jax.process_index()`` / ``process_count()``.
      worker_count: Grain worker processes (see the module docstring); 0 = threads in this process.
      read_threads: threads decoding examples; prefetch_buffer_size: examples decoded ahead (None: stage default).
      max_corrupt_fraction / corrupt_grace: the corrupt-example budget (module docstring).
    """

    seed: int = 0
    resolution: int = 512
    latents: str = "auto"
    clip: str = "auto"
    clip_size: int = 224
    tokenizer: str | None = None
    num_epochs: int | None = None
    shuffle: bool = True
    process_index: int | None = None
    process_count: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 1
    read_threads: int = 4
    prefetch_buffer_size: int | None = None
    max_corrupt_fraction: float = 0.01
    corrupt_grace: int = 100

    def __post_init__(self):
        for name in ("latents", "clip"):
            if getattr(self, name) not in ("auto", "precomputed", "pixels"):
                raise ValueError(f"{name} must be 'auto', 'precomputed' or 'pixels', got {getattr(self, name)!r}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None (endless) or >= 1, got {self.num_epochs}")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError(f"max_corrupt_fraction must lie in [0, 1], got {self.max_corrupt_fraction}")
        if self.worker_count < 0 or self.read_threads < 1:
            raise ValueError(f"worker_count must be >= 0 and read_threads >= 1, got {self.worker_count}, "
                             f"{self.read_threads}")


@dataclasses.dataclass(frozen=True)
class Stage1Config(LoaderConfig):
    """Stage 1: ``batch_size`` examples per process; ``distinct_reference``: the reference is another image of
    the target's identity whenever it has several (docs/method.md §6.1)."""

    batch_size: int = 8
    distinct_reference: bool = True
    drop_remainder: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class Stage2Config(LoaderConfig):
    """Stage 2: one identity per element, one source and ``num_targets`` targets drawn with replacement.

    ``grid_prompt_fraction``: the share of elements whose face prompts (source and targets) are the KDEF-style
    grid prompts ``"the expression is {e}, the face is {p}"`` (:func:`grid_face_prompt`) instead of the records'
    own — the optional grid-prompt source of docs/method.md §6.2. Needs records with an ``expression``; an element
    whose records lack one keeps its own prompts."""

    num_targets: int = 32
    grid_prompt_fraction: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {self.num_targets}")
        if not 0.0 <= self.grid_prompt_fraction <= 1.0:
            raise ValueError(f"grid_prompt_fraction must lie in [0, 1], got {self.grid_prompt_fraction}")


# ----------------------------------------------------------------------------------------------- helpers

_TOKENIZER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str | None):
    from dynamicid_jax.tokenizer import load_tokenizer

    return load_tokenizer(path)


@functools.lru_cache(maxsize=65536)
def _tokens(path: str | None, text: str) -> np.ndarray:
    from dynamicid_jax.tokenizer import tokenize

    with _TOKENIZER_LOCK:  # fast tokenizers are not safe to call from several threads at once
        ids = tokenize(_tokenizer(path), [text])[0]
    ids.setflags(write=False)
    return ids


def tokenize_cached(text: str, tokenizer: str | None = None) -> np.ndarray:
    """``int32 [77]`` token ids of ``text`` (thread-safe, cached)."""
    return _tokens(tokenizer, text)


def resolve_inputs(data: FaceDataset, config: LoaderConfig) -> tuple[bool, bool]:
    """``(use precomputed latents, use precomputed CLIP features)`` for ``data`` under ``config``."""
    lat, clip = data.manifest.latents, data.manifest.clip_features
    use_latents = False
    if config.latents != "pixels" and lat is not None:
        if int(lat["resolution"]) == config.resolution:
            use_latents = True
        elif config.latents == "precomputed":
            raise ValueError(f"the shards' latents were computed at resolution {lat['resolution']}, the loader is "
                             f"configured for {config.resolution}")
        else:
            log.warning("precomputed latents are at resolution %s, not %s: decoding pixels instead",
                        lat["resolution"], config.resolution)
    elif config.latents == "precomputed":
        raise ValueError("latents='precomputed' but the shards hold no latents (build them with --latents)")
    if config.clip == "precomputed" and clip is None:
        raise ValueError("clip='precomputed' but the shards hold no CLIP features (build them with --clip-vision)")
    return use_latents, config.clip != "pixels" and clip is not None


def _as_dataset(data: FaceDataset | str | os.PathLike) -> FaceDataset:
    if isinstance(data, FaceDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return open_shards(data)
    raise TypeError(f"data: expected a FaceDataset or a shard folder, got {type(data).__name__}")


def _layout(config: LoaderConfig) -> tuple[int, int]:
    if config.process_index is None or config.process_count is None:
        import jax

        index = jax.process_index() if config.process_index is None else config.process_index
        count = jax.process_count() if config.process_count is None else config.process_count
    else:
        index, count = config.process_index, config.process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} must lie in [0, process_count={count})")
    return int(index), int(count)


def _corrupt(position: int, err: Exception) -> dict:
    return {"__corrupt__": int(position), "error": f"{type(err).__name__}: {err}"}


# ------------------------------------------------------------------------------------------ element makers

class _Records:
    """Record access shared by the element makers (picklable: holds the source and the identity index)."""

    def __init__(self, data: FaceDataset, config: LoaderConfig):
        self.source = data.source
        self.identity_of = data.manifest.record_identities()
        self.members = {e.id: np.asarray(e.records, np.int64) for e in data.manifest.identities if e.records}
        self.embedding_dim = data.manifest.embedding_dim
        self.config = config
        self.use_latents, self.use_clip = resolve_inputs(data, config)
        lat = data.manifest.latents
        self.latent_shape = tuple(lat["shape"]) if self.use_latents else None

    def record(self, index: int) -> FaceRecord:
        rec = decode_record(self.source[int(index)])
        if rec.identity != self.identity_of[index]:
            raise CorruptRecordError(f"record {index} ({rec.key!r}) has identity {rec.identity}, the manifest says "
                                     f"{self.identity_of[index]}")
        if rec.embedding.shape != (self.embedding_dim,):
            raise CorruptRecordError(f"record {index} ({rec.key!r}): embedding of dim {rec.embedding.shape[0]}, "
                                     f"the manifest says {self.embedding_dim}")
        return rec

    def target(self, rec: FaceRecord) -> np.ndarray:
        if self.use_latents:
            if rec.latent_moments is None or tuple(rec.latent_moments.shape) != self.latent_shape:
                got = None if rec.latent_moments is None else list(rec.latent_moments.shape)
                raise CorruptRecordError(f"record {rec.key!r}: latent moments {got}, expected "
                                         f"{list(self.latent_shape)}")
            return np.asarray(rec.latent_moments, np.float32)
        return to_signed_unit(resize_center_crop(rec.decode_image(), self.config.resolution))

    def clip_input(self, rec: FaceRecord) -> np.ndarray:
        if self.use_clip:
            if rec.clip_features is None:
                raise CorruptRecordError(f"record {rec.key!r} has no CLIP features")
            return np.asarray(rec.clip_features, np.float32)
        from dynamicid_jax.models.clip import clip_preprocess

        return clip_preprocess(rec.decode_image(), size=self.config.clip_size)[0]

    def tokens(self, text: str) -> np.ndarray:
        return tokenize_cached(text, self.config.tokenizer)


class _Stage1Example:
    def __init__(self, records: _Records, distinct: bool):
        self.records, self.distinct = records, distinct

    def __call__(self, target_index: int, rng: np.random.Generator) -> dict:
        r = self.records
        target_index = int(target_index)
        members = r.members[int(r.identity_of[target_index])]
        ref_index = target_index
        if self.distinct and len(members) > 1:
            j = int(rng.integers(len(members) - 1))
            j += int(j >= int(np.searchsorted(members, target_index)))
            ref_index = int(members[j])
        try:
            target = r.record(target_index)
            ref = target if ref_index == target_index else r.record(ref_index)
            out = {"target_pixels" if not r.use_latents else "target_latent_moments": r.target(target),
                   "ref_clip_features" if r.use_clip else "ref_clip_pixels": r.clip_input(ref),
                   "ref_id_embedding": np.asarray(ref.embedding, np.float32),
                   "input_ids": r.tokens(target.caption),
                   "target_face_box": box_in_center_crop(target.bbox, target.image_size, r.config.resolution),
                   "identity": np.int32(target.identity),
                   "target_index": np.int32(target_index), "ref_index": np.int32(ref_index)}
        except (RecordError, OSError) as err:
            return _corrupt(target_index, err)
        return out


class _Stage2Example:
    def __init__(self, records: _Records, identities: np.ndarray, num_targets: int, grid_fraction: float = 0.0):
        self.records, self.identities, self.num_targets = records, identities, num_targets
        self.grid_fraction = grid_fraction

    def __call__(self, position: int, rng: np.random.Generator) -> dict:
        r = self.records
        identity = int(self.identities[int(position)])
        members = r.members[identity]
        src = int(members[rng.integers(len(members))])
        tgt = members[rng.integers(len(members), size=self.num_targets)].astype(np.int64)
        # drawn last, and only when enabled, so that the stream without grid prompts is unchanged
        grid = self.grid_fraction > 0 and bool(rng.uniform() < self.grid_fraction)
        try:
            recs = {int(i): r.record(int(i)) for i in np.unique(np.append(tgt, src))}
            wanted = set(tgt.tolist())
            targets = {i: r.target(rec) for i, rec in recs.items() if i in wanted}
            rasters = {i: rec.raster() for i, rec in recs.items()}
            prompts = {i: rec.face_prompt for i, rec in recs.items()}
            if grid:
                grid_prompts = {i: grid_face_prompt(rec.expression, rec.pose) for i, rec in recs.items()}
                grid = all(p is not None for p in grid_prompts.values())
                if grid:
                    prompts = grid_prompts
                else:
                    _warn_once("grid prompts need records with an expression label; elements without keep their "
                               "own face prompts")
            key = "tgt_latent_moments" if r.use_latents else "tgt_pixels"
            return {"src_raster": rasters[src],
                    "tgt_rasters": np.stack([rasters[int(i)] for i in tgt]),
                    "src_face_prompt_ids": r.tokens(prompts[src]),
                    "tgt_face_prompt_ids": np.stack([r.tokens(prompts[int(i)]) for i in tgt]),
                    key: np.stack([targets[int(i)] for i in tgt]),
                    "src_index": np.int32(src), "tgt_index": tgt.astype(np.int32), "identity": np.int32(identity),
                    "grid_prompt": np.bool_(grid)}
        except (RecordError, OSError) as err:
            return _corrupt(position, err)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


class _RecordExample:
    def __init__(self, records: _Records):
        self.records = records

    def __call__(self, index: int) -> dict:
        r = self.records
        try:
            rec = r.record(index)
            return {"index": np.int32(index), "identity": np.int32(rec.identity),
                    "ref_id_embedding": np.asarray(rec.embedding, np.float32),
                    "ref_clip_features" if r.use_clip else "ref_clip_pixels": r.clip_input(rec)}
        except (RecordError, OSError) as err:
            return _corrupt(index, err)


# ---------------------------------------------------------------------------------------------------------
# The last stage of every loader: skip corrupt examples (counted, with a bound), then batch. ``make_example`` turns
# a record that cannot be decoded into {"__corrupt__": True, "error": …} instead of raising; docs/data.md.
# ---------------------------------------------------------------------------------------------------------
class CorruptDataError(DynamicIDError, RuntimeError):
    """More corrupt examples than ``max_corrupt_fraction`` allows (the message names the last bad shard/record)."""


def _collate(items: list[dict]) -> dict:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


class CollectIterator(grain.DatasetIterator):
    """Skips corrupt examples (counted, bounded), then stacks ``batch_size`` examples (or passes them through)."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int | None, drop_remainder: bool,
                 max_fraction: float, grace: int):
        super().__init__(parent)
        self._batch_size, self._drop_remainder = batch_size, drop_remainder
        self._max_fraction, self._grace = max_fraction, grace
        self._seen = 0
        self._skipped = 0
        self._recent: collections.deque[str] = collections.deque(maxlen=5)

    @property
    def stats(self) -> dict:
        """``{"seen", "skipped", "recent_errors"}`` — examples read and corrupt ones skipped (since the start of
        the run, restored with the iterator state)."""
        return {"seen": self._seen, "skipped": self._skipped, "recent_errors": list(self._recent)}

    def _next_good(self) -> dict:
        while True:
            element = next(self._parent)
            self._seen += 1
            if "__corrupt__" not in element:
                return element
            self._skipped += 1
            self._recent.append(element["error"])
            if self._skipped <= 10 or self._skipped % 1000 == 0:
                log.warning("skipping corrupt example (%d skipped of %d): %s", self._skipped, self._seen,
                            element["error"])
            if self._skipped > self._max_fraction * max(self._seen, self._grace):
                raise CorruptDataError(
                    f"{self._skipped} of {self._seen} examples were corrupt, more than max_corrupt_fraction="
                    f"{self._max_fraction} allows (counted over at least {self._grace}); last error: "
                    f"{element['error']}")

    def __next__(self) -> dict:
        if self._batch_size is None:
            return self._next_good()
        items = []
        while len(items) < self._batch_size:
            try:
                items.append(self._next_good())
            except StopIteration:
                if items and not self._drop_remainder:
                    break
                raise
        return _collate(items)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "seen": self._seen, "skipped": self._skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._seen, self._skipped = int(state["seen"]), int(state["skipped"])
        self._recent.clear()

    def __str__(self) -> str:
        return f"CollectIterator(batch_size={self._batch_size})"


class CollectDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int | None, drop_remainder: bool,
                 max_fraction: float, grace: int):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, max_fraction, grace)

    def __iter__(self) -> CollectIterator:
        return CollectIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"CollectDataset(batch_size={self._args[0]})"


def _pipeline(n: int, make, config: LoaderConfig, batch_size: int | None, drop_remainder: bool,
              default_prefetch: int, *, repeat: bool = True, shuffle: bool | None = None) -> grain.IterDataset:
    if n == 0:
        raise ValueError("the dataset has no usable records")
    index, count = _layout(config)
    ds = grain.MapDataset.range(n).seed(config.seed)
    if config.shuffle if shuffle is None else shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat(config.num_epochs)
        ds = ds.random_map(make)
        if config.num_epochs is not None and drop_remainder:
            ds = ds[:len(ds) // count * count]  # every process gets the same number of elements
    else:
        ds = ds.map(make)
    ds = ds[index::count]
    prefetch = config.prefetch_buffer_size if config.prefetch_buffer_size is not None else default_prefetch
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=prefetch))
    if config.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return CollectDataset(it, batch_size, drop_remainder, config.max_corrupt_fraction, config.corrupt_grace)


# ------------------------------------------------------------------------------------------ public API

def stage1_loader(data: FaceDataset | str | os.PathLike, config: Stage1Config = Stage1Config()) -> grain.IterDataset:
    """Stage-1 batches (``schema`` module docstring): every record is a target once per epoch; its reference is
    another image of the same identity (``distinct_reference``) chosen at random, else itself."""
    data = _as_dataset(data)
    records = _Records(data, config)
    make = _Stage1Example(records, config.distinct_reference)
    return _pipeline(len(data), make, config, config.batch_size, config.drop_remainder, 2 * config.batch_size)


def stage2_loader(data: FaceDataset | str | os.PathLike, config: Stage2Config = Stage2Config()) -> grain.IterDataset:
    """Stage-2 elements (``schema`` module docstring): every identity with records once per epoch; a random
    source and ``num_targets`` targets drawn with replacement from its images; ``grid_prompt`` (bool) says
    whether the element's face prompts are grid prompts (``Stage2Config.grid_prompt_fraction``)."""
    data = _as_dataset(data)
    records = _Records(data, config)
    identities = np.asarray(sorted(records.members), np.int64)
    make = _Stage2Example(records, identities, config.num_targets, config.grid_prompt_fraction)
    return _pipeline(len(identities), make, config, None, True, 2)


def record_loader(data: FaceDataset | str | os.PathLike, batch_size: int,
                  config: LoaderConfig = LoaderConfig()) -> grain.IterDataset:
    """Every record once, in index order, this process's share (``index % process_count == process_index``),
    in batches of ``batch_size`` (the last one smaller): ``"index"``, ``"identity"``, ``"ref_id_embedding"`` and
    ``"ref_clip_pixels"`` / ``"ref_clip_features"`` — what a trainer needs to precompute per-record ID tokens
    (stage 2's target-token cache). Corrupt records are skipped and counted like the training loaders'."""
    data = _as_dataset(data)
    records = _Records(data, config)
    return _pipeline(len(data), _RecordExample(records), config, batch_size, False, 2 * batch_size,
                     repeat=False, shuffle=False)
