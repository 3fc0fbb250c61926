"""ArrayRecord shards of face records: the atomic shard writer, the manifest, and random-access readers.

A dataset folder written by :func:`data_pipelines.build_shards.build_shards` holds

* ``faces-00000-of-00004.array_record`` …: ArrayRecord files (``group_size:1``, so every record is one random
  read), each record a serialised :class:`~data_pipelines.schema.FaceRecord`;
* ``faces-00000-of-00004.json`` …: per-shard summaries (the records' keys and identities, skipped images, a
  fingerprint of the inputs) — they let a rerun skip finished shards;
* ``manifest.json``: the dataset summary (:class:`Manifest`): shard list in reading order, counts, skipped images
  by reason, and the identity index (identity → global record indices).

Global record index ``i`` is the ``i``-th record of the concatenation of the manifest's shards, in order — the
same order :class:`ShardSource` (and the TFDS builder) presents.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from dynamicid_jax.file_io import atomic_path

from .schema import CorruptRecordError, FaceRecord, RecordError, decode_record

__all__ = [
    "MANIFEST_NAME", "MANIFEST_FORMAT", "MANIFEST_VERSION", "ShardWriter", "Manifest",
    "IdentityEntry", "CorruptShardError", "load_manifest", "RecordSource", "ShardSource", "FaceDataset", "open_shards",
]

class CorruptShardError(RecordError):
    """A shard file that cannot be opened at all (the message names it)."""


MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dynamicid-face-shards"
MANIFEST_VERSION = 1
_WRITER_OPTIONS = "group_size:1"


class ShardWriter:
    """Write one ArrayRecord shard atomically: records go to a temp file that :meth:`close` renames to ``path``.

    Use as a context manager; on an exception the temp file is removed and ``path`` is left untouched::

        with ShardWriter(path) as w:
            for rec in records:
                w.write(rec.to_bytes())
    """

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = os.fspath(path)
        # the library's atomic write: a temporary file beside the shard, renamed over it by close(), removed by abort()
        self._atomic = contextlib.ExitStack()
        self._tmp = self._atomic.enter_context(atomic_path(self.path, suffix=".array_record"))
        self._writer = ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)
        self.num_records = 0
        self._done = False

    def write(self, record: bytes | FaceRecord) -> None:
        if self._done:
            raise RuntimeError(f"shard {self.path!r} is already closed")
        data = record.to_bytes() if isinstance(record, FaceRecord) else record
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"ShardWriter.write: expected bytes or a FaceRecord, got {type(record).__name__}")
        self._writer.write(bytes(data))
        self.num_records += 1

    def close(self) -> None:
        if self._done:
            return
        self._writer.close()
        self._atomic.close()  # fsynced, given the umask's mode, renamed over the shard
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        try:
            self._writer.close()
        finally:
            aborted = RuntimeError(f"shard {self.path!r} aborted")
            self._atomic.__exit__(RuntimeError, aborted, None)  # the temporary file is removed, the shard untouched
            self._done = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------- manifest

@dataclasses.dataclass(frozen=True)
class IdentityEntry:
    id: int
    name: str
    records: tuple[int, ...]  # global record indices
    num_images: int  # image files found for this identity (records + skipped)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds (see the module docstring). ``raw`` is the parsed JSON."""

    num_records: int
    shards: tuple[dict, ...]  # {"file": name, "num_records": n}
    identities: tuple[IdentityEntry, ...]
    skipped: dict  # reason → count
    latents: dict | None  # {"resolution", "shape", "dtype", "scaling_factor", ...} when precomputed
    clip_features: dict | None
    embedding_dim: int
    raw: dict

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def record_identities(self) -> np.ndarray:
        """``int32 [num_records]``: the identity id of every record."""
        out = np.full(self.num_records, -1, np.int32)
        for ident in self.identities:
            out[list(ident.records)] = ident.id
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{source}: not a {MANIFEST_FORMAT} manifest (format {d.get('format')!r})"
                             if isinstance(d, dict) else f"{source}: expected a JSON object")
        version = d.get("manifest_version")
        if not isinstance(version, int) or version > MANIFEST_VERSION or version < 1:
            raise ValueError(f"{source}: manifest_version {version!r} is not supported (this library reads "
                             f"version {MANIFEST_VERSION}); upgrade dynamicid-jax or rebuild the shards")
        try:
            identities = tuple(IdentityEntry(int(e["id"]), str(e["name"]), tuple(int(i) for i in e["records"]),
                                             int(e["num_images"])) for e in d["identities"])
            m = cls(num_records=int(d["num_records"]), shards=tuple(d["shards"]), identities=identities,
                    skipped=dict(d["skipped"]), latents=d.get("latents"),
                    clip_features=d.get("clip_features"), embedding_dim=int(d["embedding_dim"]), raw=d)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: malformed manifest ({type(err).__name__}: {err})") from err
        if sum(int(s["num_records"]) for s in m.shards) != m.num_records:
            raise ValueError(f"{source}: shard record counts do not add up to num_records={m.num_records}")
        seen = sorted(i for e in identities for i in e.records)
        if seen != list(range(m.num_records)):
            raise ValueError(f"{source}: the identity index does not cover records 0..{m.num_records - 1} "
                             "exactly once")
        return m


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read ``folder/manifest.json``; missing / malformed → an error naming the file."""
    from dynamicid_jax.file_io import check_readable

    path = os.path.join(os.fspath(folder), MANIFEST_NAME)
    check_readable(path, "the shard manifest")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: {os.fspath(folder)!r} is not a face-shard folder written by "
                                "build_shards (or the build did not finish)")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r}: invalid JSON ({err})") from err
    return Manifest.from_dict(d, source=path)


# ------------------------------------------------------------------------------------------------ readers

class RecordSource(Protocol):
    """Random access to serialised records (Grain's data-source protocol): ``len`` and ``[int] → bytes``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> bytes: ...


class ShardSource:
    """The records of a shard folder, in manifest order, as bytes (a picklable Grain random-access source)."""

    def __init__(self, folder: str | os.PathLike, manifest: Manifest | None = None):
        import grain

        self.folder = os.path.abspath(os.fspath(folder))
        self.manifest = manifest if manifest is not None else load_manifest(self.folder)
        from dynamicid_jax.file_io import check_readable

        shards = [s for s in self.manifest.shards if int(s["num_records"]) > 0]
        paths = [os.path.join(self.folder, s["file"]) for s in shards]
        for p in paths:
            check_readable(p, "shard file")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"shard files listed in the manifest are missing: {', '.join(missing)}")
        # open every shard on its own first: the reader's errors name no file, ours name the shard
        for p, s in zip(paths, shards):
            try:
                n = len(grain.sources.ArrayRecordDataSource([p]))
            except RuntimeError as err:
                raise CorruptShardError(f"shard file {p!r} cannot be opened: it is corrupt, truncated or empty "
                                        f"({err}); rebuild the shards (python -m data_pipelines.build_shards) "
                                        f"or restore the file") from None
            if n != int(s["num_records"]):
                raise CorruptShardError(f"shard file {p!r} holds {n} records but the manifest says "
                                        f"{s['num_records']}; rebuild the shards")
        self._paths = paths
        self._starts = np.cumsum([0] + [int(s["num_records"]) for s in shards])
        self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None
        n = 0 if self._source is None else len(self._source)
        if n != self.manifest.num_records:
            raise ValueError(f"{self.folder!r}: the shards hold {n} records but the manifest says "
                             f"{self.manifest.num_records}; rebuild the shards")

    def __len__(self) -> int:
        return self.manifest.num_records

    def __getitem__(self, index: int) -> bytes:
        if self._source is None:
            raise IndexError(f"record {index} of an empty dataset")
        try:
            return self._source[int(index)]
        except RuntimeError as err:  # the ArrayRecord reader: checksum mismatch, truncated chunk, …
            shard = int(np.searchsorted(self._starts, int(index), side="right")) - 1
            raise CorruptRecordError(f"record {int(index) - int(self._starts[shard])} of shard file "
                                     f"{self._paths[shard]!r} (global record {int(index)}) is unreadable: "
                                     f"{err}") from None

    def shard_of(self, index: int) -> str:
        """The shard file holding global record ``index``."""
        return self._paths[int(np.searchsorted(self._starts, int(index), side="right")) - 1]

    def __repr__(self) -> str:
        return f"ShardSource({self.folder!r}, num_records={self.manifest.num_records})"


@dataclasses.dataclass
class FaceDataset:
    """A random-access record source and its manifest (identity index, counts, precomputed features)."""

    source: Any  # RecordSource
    manifest: Manifest

    def __len__(self) -> int:
        return len(self.source)

    def record(self, index: int) -> FaceRecord:
        return decode_record(self.source[index])

    def records(self, indices: Iterable[int] | None = None) -> Iterable[FaceRecord]:
        for i in (range(len(self)) if indices is None else indices):
            yield self.record(i)


def open_shards(folder: str | os.PathLike) -> FaceDataset:
    """The face dataset in a folder written by ``build_shards``."""
    manifest = load_manifest(folder)
    return FaceDataset(ShardSource(folder, manifest), manifest)


def shard_name(index: int, count: int, prefix: str = "faces") -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def summary_name(index: int, count: int, prefix: str = "faces") -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.json"


def assemble_manifest(summaries: Sequence[dict], identity_names: Sequence[str], extra: dict) -> dict:
    """The manifest dict from per-shard summaries (in shard order) and the sorted identity names."""
    records: list[list[int]] = [[] for _ in identity_names]
    images = [0] * len(identity_names)
    skipped: dict[str, int] = {}
    skipped_files: list[dict] = []
    shards = []
    offset = 0
    for s in summaries:
        for j, ident in enumerate(s["record_identities"]):
            records[ident].append(offset + j)
        for ident, n in s["images_per_identity"].items():
            images[int(ident)] += int(n)
        for item in s["skipped"]:
            skipped[item["reason"]] = skipped.get(item["reason"], 0) + 1
            skipped_files.append(item)
        shards.append({"file": s["file"], "num_records": len(s["record_identities"])})
        offset += len(s["record_identities"])
    return {
        "format": MANIFEST_FORMAT, "manifest_version": MANIFEST_VERSION, "num_records": offset,
        "num_identities": len(identity_names), "shards": shards,
        "identities": [{"id": i, "name": n, "num_images": images[i], "records": records[i]}
                       for i, n in enumerate(identity_names)],
        "skipped": skipped, "skipped_files": skipped_files, **extra,
    }
