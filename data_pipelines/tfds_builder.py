"""A TensorFlow Datasets builder over face shards, for users who keep their datasets in TFDS (``[tfds]`` extra).

TensorFlow is **not** needed: with ``file_format="array_record"`` TFDS prepares the dataset with its own protobuf
copy of ``tf.train.Example`` and reads it back through ``tfds.data_source`` with NumPy decoding only (measured
with tensorflow-datasets 4.9.10 and no TensorFlow installed).

The builder takes a folder written by :func:`data_pipelines.build_shards.build_shards` as its *manual* data::

    builder = prepare_tfds("/data/faces_shards", data_dir="~/tensorflow_datasets")   # once
    data = open_tfds(data_dir="~/tensorflow_datasets")   # → FaceDataset, usable by the Grain loaders
    # equivalently: tfds.data_source("dynamicid_faces", split="train", data_dir=...) + the manifest metadata

Each TFDS example is ``{"record": <the face record bytes, unchanged>, "identity": int32, "key": str}``; shuffling
is disabled and the example keys are the global record indices, so TFDS index ``i`` is record ``i`` of the shards
and the manifest (stored in the dataset's ``metadata.json``) applies unchanged. One split, ``"train"``.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

try:
    import tensorflow_datasets as tfds
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("data_pipelines.tfds_builder needs tensorflow-datasets: pip install 'dynamicid-jax[tfds]'"
                      ) from err
if importlib.util.find_spec("importlib_resources") is None:  # pragma: no cover
    # tensorflow-datasets 4.9.x uses it to locate builder code inside packages but declares it only for
    # Python < 3.9, so a plain install lacks it and download_and_prepare fails with ModuleNotFoundError.
    raise ImportError("data_pipelines.tfds_builder needs the 'importlib_resources' package (used by "
                      "tensorflow-datasets, not declared by it for this Python): pip install importlib_resources")

from .schema import SCHEMA_VERSION, decode_record
from .shards import FaceDataset, Manifest, open_shards

__all__ = ["DynamicidFaces", "NAME", "prepare_tfds", "open_tfds", "TfdsRecordSource"]

NAME = "dynamicid_faces"


class DynamicidFaces(tfds.core.GeneratorBasedBuilder):
    """DynamicID face records (see the module docstring); manual data = a ``build_shards`` output folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": f"Face records of schema version {SCHEMA_VERSION}."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Build face shards with `python -m data_pipelines.build_shards --images DIR --out SHARDS --analyzer NAME` "
        "and pass download_config=tfds.download.DownloadConfig(manual_dir=SHARDS).")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Images of identities with face analysis (DynamicID face records, msgpack).",
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                "identity": tfds.features.Scalar(dtype=np.int32),
                "key": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        data = open_shards(os.fspath(dl_manager.manual_dir))
        self.info.metadata["manifest"] = data.manifest.raw
        self.info.metadata["record_schema_version"] = SCHEMA_VERSION
        return {"train": self._generate_examples(data)}

    def _generate_examples(self, data: FaceDataset):
        for i in range(len(data)):
            raw = data.source[i]
            rec = decode_record(raw)  # refuse to package unreadable records
            yield i, {"record": raw, "identity": rec.identity, "key": rec.key}


def prepare_tfds(shards_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> DynamicidFaces:
    """Package the shard folder ``shards_dir`` as the TFDS dataset ``dynamicid_faces`` under ``data_dir``."""
    builder = DynamicidFaces(data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(shards_dir)))
    return builder


class TfdsRecordSource:
    """A ``tfds.data_source`` split presented as record bytes (the Grain source protocol; picklable)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return self._source[int(index)]["record"]

    def __repr__(self) -> str:
        return f"TfdsRecordSource({self._source!r})"


def open_tfds(data_dir: str | os.PathLike | None = None, split: str = "train", name: str = NAME) -> FaceDataset:
    """The prepared TFDS dataset as a :class:`~data_pipelines.shards.FaceDataset` (records + manifest)."""
    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    builder = tfds.builder(name, **kwargs)
    raw = builder.info.metadata.get("manifest") if builder.info.metadata is not None else None
    if raw is None:
        raise ValueError(f"TFDS dataset {name!r} has no face-shard manifest in its metadata; it was not prepared by "
                         "data_pipelines.tfds_builder")
    source = tfds.data_source(name, split=split, **kwargs)
    manifest = Manifest.from_dict(raw, source=f"TFDS {name} metadata")
    if len(source) != manifest.num_records:
        raise ValueError(f"TFDS {name}/{split} holds {len(source)} examples, its manifest {manifest.num_records}")
    return FaceDataset(TfdsRecordSource(source), manifest)
