"""Training data for DynamicID: face records, ArrayRecord shards, a TFDS builder and Grain loaders.

* :mod:`.schema` — the versioned face record and the stage-1 / stage-2 batch contract;
* :mod:`.shards` — atomic shard writer, manifest, random-access readers (``open_shards``);
* :mod:`.build_shards` — ``python -m data_pipelines.build_shards`` / ``build_shards(...)``: images → shards;
* :mod:`.tfds_builder` — the same records as a TFDS dataset (optional ``[tfds]`` extra; imported on demand);
* :mod:`.loaders` — Grain loaders for stage 1 and stage 2.
"""
from .schema import (
    SCHEMA_VERSION,
    CorruptRecordError,
    FaceRecord,
    RecordError,
    RecordVersionError,
    decode_record,
    encode_record,
    validate_stage1_batch,
    validate_stage2_example,
)
from .shards import FaceDataset, Manifest, ShardWriter, load_manifest, open_shards

__all__ = [
    "SCHEMA_VERSION", "FaceRecord", "RecordError", "RecordVersionError", "CorruptRecordError", "encode_record",
    "decode_record", "validate_stage1_batch", "validate_stage2_example", "FaceDataset", "Manifest", "ShardWriter",
    "load_manifest", "open_shards",
]
