"""The face record (one image of one identity) and the batch contract of the stage-1 / stage-2 loaders.

Record format (``SCHEMA_NAME`` ``"dynamicid-face-record"``, ``SCHEMA_VERSION`` 1)
-------------------------------------------------------------------------------
One record is one msgpack map (``msgpack.packb(..., use_bin_type=True)``). Numpy arrays are stored as maps
``{"dtype": "<f4", "shape": [...], "data": <raw little-endian bytes>}`` (dtypes: ``<f2 <f4 <i4 <i8 |u1``).

=====================  ========================  ===================================================================
key                    type                      meaning
=====================  ========================  ===================================================================
``schema``             str                       always ``"dynamicid-face-record"``
``version``            int                       the record schema version (1)
``key``                str                       ``"{identity}/{image file name}"``, unique in a dataset
``identity``           int                       identity id (index of the identity folder in sorted order)
``identity_name``      str                       the identity folder's name
``image``              bytes                     the original JPEG / PNG file (re-encoded as PNG when the file was
                                                 another format or carried an EXIF rotation)
``image_format``       str                       ``"jpeg"`` or ``"png"``
``image_size``         [int, int]                ``(width, height)`` of the decoded image
``face_crop``          bytes                     PNG of the 112×112 ArcFace-aligned face crop
``bbox``               f4 [4]                    ``[x0, y0, x1, y1]``, pixels of the image
``kps``                f4 [5, 2]                 5 keypoints (insightface order), pixels
``landmarks``          f4 [N, 2]                 dense landmarks (106 insightface, 68 dlib), pixels
``pose``               f4 [3]                    (pitch, yaw, roll) in degrees
``embedding``          f4 [D]                    L2-normalised identity embedding of the analyzer
``det_score``          float                     detector confidence
``analyzer``           str                       the face-analysis backend's name
``caption``            str                       the image caption (``""`` when none)
``face_prompt``        str                       the face prompt (IMR text: expression + view)
``face_prompt_source`` str                       ``"sidecar"`` (given with the image) or ``"auto"`` (from the pose)
``expression``         str or nil                expression label, when known
``latent_moments``     f4/f2 [h, w, 2C] or nil   VAE posterior moments ``mean ‖ logvar`` (unscaled, before
                                                 ``scaling_factor``) of the resized + centre-cropped image
``latent_resolution``  int or nil                the square crop size the moments were computed at
``clip_features``      f4/f2 [L, C] or nil       CLIP vision **penultimate** hidden states of the whole image
=====================  ========================  ===================================================================

Compatibility rules: readers ignore keys they do not know (adding an optional field does not bump the version);
an incompatible change bumps ``SCHEMA_VERSION`` and adds an upgrade function to ``_UPGRADES`` (old version → next).
A record whose version is newer than this library's raises :class:`RecordVersionError` (upgrade the library); an
older version without an upgrade path raises it as well. Anything malformed raises :class:`CorruptRecordError`.

Batch contract
--------------
Stage 1 (:func:`data_pipelines.loaders.stage1_loader`): each element is a dict of numpy arrays for this process
(``B`` = per-process batch size, ``R`` = configured resolution, ``f`` = the VAE's downsampling factor, 8 for
SD1.5, ``C`` = its latent channels, 4 for SD1.5):

* ``"target_pixels"`` float32 ``[B, R, R, 3]`` in ``[-1, 1]``: the target image, shortest side resized to ``R``
  (bilinear) then centre-cropped — **or**, when latents were precomputed, ``"target_latent_moments"`` float32
  ``[B, R/f, R/f, 2C]`` (``mean ‖ logvar``; the trainer samples ``mean + exp(logvar/2)·ε`` each step and multiplies
  by the VAE's ``scaling_factor``);
* ``"ref_clip_pixels"`` float32 ``[B, 224, 224, 3]``: the whole *reference* image through
  ``dynamicid_jax.models.clip.clip_preprocess`` — **or**, when precomputed, ``"ref_clip_features"`` float32
  ``[B, 257, 1280]`` (penultimate CLIP-H hidden states);
* ``"ref_id_embedding"`` float32 ``[B, D]``: the reference face's identity embedding;
* ``"input_ids"`` int32 ``[B, 77]``: the *target*'s caption tokens (``dynamicid_jax.tokenizer.tokenize``);
* ``"identity"`` int32 ``[B]``;
* extras: ``"target_index"`` / ``"ref_index"`` int32 ``[B]`` (record indices).

The reference is another image of the same identity whenever the identity has several (docs/method.md §6.1, a
config flag), else the target itself.

Stage 2 (:func:`data_pipelines.loaders.stage2_loader`): one identity per element, no batch axis (``T`` targets
sampled with replacement from the identity, possibly including the source):

* ``"src_raster"`` float32 ``[96, 96, 1]``, ``"tgt_rasters"`` float32 ``[T, 96, 96, 1]``: IMR landmark rasters
  in ``{-1, 1}`` (``dynamicid_jax.faces.raster_from_landmarks`` of the stored landmarks);
* ``"src_face_prompt_ids"`` int32 ``[77]``, ``"tgt_face_prompt_ids"`` int32 ``[T, 77]``;
* ``"tgt_latent_moments"`` float32 ``[T, R/f, R/f, 2C]`` — **or** ``"tgt_pixels"`` float32 ``[T, R, R, 3]``;
* ``"src_index"`` int32 ``[]``, ``"tgt_index"`` int32 ``[T]``: record indices (keys of the trainer's cache of
  stage-1 target tokens);
* ``"identity"`` int32 ``[]``.

:func:`validate_stage1_batch` / :func:`validate_stage2_example` check an element against this contract.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Mapping

import msgpack
import numpy as np

__all__ = [
    "SCHEMA_NAME", "SCHEMA_VERSION", "RecordError", "RecordVersionError", "CorruptRecordError", "FaceRecord",
    "encode_record", "decode_record", "decode_image_bytes", "resize_center_crop", "box_in_center_crop",
    "to_signed_unit",
    "TOKEN_LENGTH", "STAGE1_REQUIRED", "STAGE2_REQUIRED", "validate_stage1_batch", "validate_stage2_example",
]

SCHEMA_NAME = "dynamicid-face-record"
SCHEMA_VERSION = 1
TOKEN_LENGTH = 77

_ARRAY_DTYPES = {"<f2", "<f4", "<i4", "<i8", "|u1"}
# old version → function upgrading a decoded payload dict to the next version (none yet: version 1 is the first)
_UPGRADES: dict[int, Callable[[dict], dict]] = {}


class RecordError(ValueError):
    """A record that cannot be used."""


class RecordVersionError(RecordError):
    """A record written with a schema version this library cannot read."""


class CorruptRecordError(RecordError):
    """Bytes that are not a well-formed face record."""


@dataclasses.dataclass(eq=False)
class FaceRecord:
    """One image of one identity, with its face analysis (see the module docstring for each field)."""

    key: str
    identity: int
    identity_name: str
    image: bytes
    image_format: str
    image_size: tuple[int, int]
    face_crop: bytes
    bbox: np.ndarray
    kps: np.ndarray
    landmarks: np.ndarray
    pose: np.ndarray
    embedding: np.ndarray
    det_score: float
    analyzer: str
    caption: str = ""
    face_prompt: str = ""
    face_prompt_source: str = "auto"
    expression: str | None = None
    latent_moments: np.ndarray | None = None
    latent_resolution: int | None = None
    clip_features: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        return encode_record(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "FaceRecord":
        return decode_record(data)

    def decode_image(self) -> np.ndarray:
        """The image as RGB ``uint8 [H, W, 3]``."""
        return decode_image_bytes(self.image, f"record {self.key!r} image")

    def decode_face_crop(self) -> np.ndarray:
        """The aligned face crop as RGB ``uint8 [112, 112, 3]``."""
        return decode_image_bytes(self.face_crop, f"record {self.key!r} face crop")

    def raster(self) -> np.ndarray:
        """The IMR landmark raster ``float32 [96, 96, 1]`` of this image's face."""
        from dynamicid_jax.faces import raster_from_landmarks

        return raster_from_landmarks(self.landmarks, tuple(self.image_size))


# ----------------------------------------------------------------------------------------------- encoding

def _pack_array(value: np.ndarray) -> dict:
    arr = np.ascontiguousarray(value)
    if arr.dtype.str not in _ARRAY_DTYPES:
        raise ValueError(f"cannot store an array of dtype {arr.dtype} in a face record (allowed: "
                         f"{', '.join(sorted(_ARRAY_DTYPES))})")
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}


def _check_shape(arr: np.ndarray, name: str, shape: tuple) -> np.ndarray:
    """``shape`` entries: an int (exact) or None (any); raises ValueError naming the field."""
    if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"face record field {name!r}: expected shape {want}, got {list(arr.shape)}")
    return arr


_ARRAY_FIELDS = {"bbox": (4,), "kps": (5, 2), "landmarks": (None, 2), "pose": (3,), "embedding": (None,)}
_STRING_FIELDS = ("key", "identity_name", "image_format", "analyzer", "caption", "face_prompt",
                  "face_prompt_source")


def _validated(rec: FaceRecord) -> None:
    for name, shape in _ARRAY_FIELDS.items():
        _check_shape(np.asarray(getattr(rec, name)), name, shape)
    if rec.image_format not in ("jpeg", "png"):
        raise ValueError(f"face record field 'image_format': expected 'jpeg' or 'png', got {rec.image_format!r}")
    if rec.face_prompt_source not in ("sidecar", "auto"):
        raise ValueError(f"face record field 'face_prompt_source': expected 'sidecar' or 'auto', got "
                         f"{rec.face_prompt_source!r}")
    if rec.latent_moments is not None:
        m = _check_shape(np.asarray(rec.latent_moments), "latent_moments", (None, None, None))
        if m.shape[-1] % 2 or rec.latent_resolution is None:
            raise ValueError("face record field 'latent_moments': expected [h, w, 2C] (mean ‖ logvar) and a "
                             f"latent_resolution, got shape {list(m.shape)}, resolution {rec.latent_resolution}")
    if rec.clip_features is not None:
        _check_shape(np.asarray(rec.clip_features), "clip_features", (None, None))


def encode_record(rec: FaceRecord) -> bytes:
    """Serialise ``rec`` (schema version :data:`SCHEMA_VERSION`); bad fields raise ValueError naming them."""
    _validated(rec)
    payload: dict[str, Any] = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION}
    for name in _STRING_FIELDS:
        payload[name] = str(getattr(rec, name))
    payload.update(
        identity=int(rec.identity), image=bytes(rec.image), image_size=[int(v) for v in rec.image_size],
        face_crop=bytes(rec.face_crop), det_score=float(rec.det_score), expression=rec.expression,
        latent_resolution=None if rec.latent_resolution is None else int(rec.latent_resolution),
    )
    for name in _ARRAY_FIELDS:
        payload[name] = _pack_array(np.asarray(getattr(rec, name), np.float32))
    for name in ("latent_moments", "clip_features"):
        value = getattr(rec, name)
        payload[name] = None if value is None else _pack_array(np.asarray(value))
    return msgpack.packb(payload, use_bin_type=True)


# ----------------------------------------------------------------------------------------------- decoding

def _unpack_array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise CorruptRecordError(f"face record field {name!r}: expected an array map {{dtype, shape, data}}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if dtype not in _ARRAY_DTYPES or not isinstance(shape, list) or not isinstance(data, bytes) \
            or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CorruptRecordError(f"face record field {name!r}: bad array header (dtype {dtype!r}, shape {shape!r})")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise CorruptRecordError(f"face record field {name!r}: {len(data)} data bytes for shape {shape} {dtype} "
                                 f"(expected {expected})")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _upgrade(payload: dict) -> dict:
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptRecordError(f"face record has no integer 'version' (got {version!r})")
    if version > SCHEMA_VERSION:
        raise RecordVersionError(f"face record schema version {version} is newer than this library supports "
                                 f"({SCHEMA_VERSION}); upgrade dynamicid-jax to read these shards")
    while version < SCHEMA_VERSION:
        if version not in _UPGRADES:
            raise RecordVersionError(f"face record schema version {version} is not supported (this library "
                                     f"reads version {SCHEMA_VERSION}); rebuild the shards with build_shards")
        payload = _UPGRADES[version](dict(payload))
        version = payload["version"]
    return payload


def decode_record(data: bytes) -> FaceRecord:
    """Parse record bytes → :class:`FaceRecord` (arrays are read-only views of ``data``).

    Raises :class:`RecordVersionError` for an unknown schema version, :class:`CorruptRecordError` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptRecordError(f"face record: expected bytes, got {type(data).__name__}")
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated exception types for garbage input
        raise CorruptRecordError(f"face record: not a msgpack map ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_NAME:
        got = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise CorruptRecordError(f"not a face record: schema {got!r}, expected {SCHEMA_NAME!r}")
    payload = _upgrade(payload)
    required = (*_STRING_FIELDS, "identity", "image", "image_size", "face_crop", "det_score", *_ARRAY_FIELDS)
    missing = [k for k in required if k not in payload]
    if missing:
        raise CorruptRecordError(f"face record (version {payload['version']}) lacks fields: {', '.join(missing)}")
    try:
        kwargs: dict[str, Any] = {name: payload[name] for name in _STRING_FIELDS}
        if not all(isinstance(v, str) for v in kwargs.values()):
            raise CorruptRecordError("face record: a text field is not a string")
        for name in _ARRAY_FIELDS:
            kwargs[name] = _unpack_array(payload[name], name)
        for name in ("latent_moments", "clip_features"):
            value = payload.get(name)
            kwargs[name] = None if value is None else _unpack_array(value, name)
        size = payload["image_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise CorruptRecordError(f"face record field 'image_size': expected [width, height], got {size!r}")
        if not isinstance(payload["image"], bytes) or not isinstance(payload["face_crop"], bytes):
            raise CorruptRecordError("face record: 'image' / 'face_crop' must be bytes")
        rec = FaceRecord(identity=int(payload["identity"]), image=payload["image"], image_size=tuple(size),
                         face_crop=payload["face_crop"], det_score=float(payload["det_score"]),
                         expression=payload.get("expression"), latent_resolution=payload.get("latent_resolution"),
                         **kwargs)
        _validated(rec)
    except CorruptRecordError:
        raise
    except (TypeError, ValueError) as err:
        raise CorruptRecordError(f"face record {payload.get('key')!r}: {err}") from err
    return rec


# ------------------------------------------------------------------------------------------------ images

def decode_image_bytes(data: bytes, what: str = "image") -> np.ndarray:
    """JPEG / PNG bytes → RGB ``uint8 [H, W, 3]``; undecodable data raises :class:`CorruptRecordError`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise CorruptRecordError(f"{what}: cannot decode ({type(err).__name__}: {err})") from err


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shortest side → ``size`` (bilinear, PIL with antialiasing), then the centre ``size × size`` crop → uint8.

    The target-image transform of stage 1 (docs/method.md §6.1: resize 512 + centre crop 512). The longer side is
    ``int(size · long / short)``; the crop starts at ``round((side − size) / 2)``.
    """
    from PIL import Image

    h, w = image.shape[:2]
    if size <= 0 or min(h, w) == 0:
        raise ValueError(f"resize_center_crop: bad size {size} for an image of {w}x{h}")
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    if (new_w, new_h) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def box_in_center_crop(bbox: np.ndarray, image_size: tuple[int, int], size: int) -> np.ndarray:
    """A face box ``[x0, y0, x1, y1]`` (pixels of an image of ``image_size = (width, height)``) → where it lies in
    :func:`resize_center_crop`'s ``size × size`` output, normalised and clipped to ``[0, 1]``, as
    ``[y0, x0, y1, x1]`` (the order of the SAA boxes)."""
    w, h = (int(v) for v in image_size)
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x0, y0, x1, y1 = (float(v) for v in bbox)
    ys = (np.array([y0, y1]) * new_h / h - top) / size
    xs = (np.array([x0, x1]) * new_w / w - left) / size
    return np.clip(np.array([ys[0], xs[0], ys[1], xs[1]], np.float32), 0.0, 1.0)


def to_signed_unit(image: np.ndarray) -> np.ndarray:
    """uint8 ``[0, 255]`` → float32 ``[-1, 1]``."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# ----------------------------------------------------------------------------------------- batch contract

#: required keys of a stage-1 batch; each tuple lists alternatives (exactly one must be present)
STAGE1_REQUIRED = (("target_pixels", "target_latent_moments"), ("ref_clip_pixels", "ref_clip_features"),
                   ("ref_id_embedding",), ("input_ids",), ("identity",))
STAGE2_REQUIRED = (("src_raster",), ("tgt_rasters",), ("src_face_prompt_ids",), ("tgt_face_prompt_ids",),
                   ("tgt_latent_moments", "tgt_pixels"), ("src_index",), ("tgt_index",), ("identity",))


def _expect(batch: Mapping[str, np.ndarray], key: str, dtype, shape: tuple, what: str) -> None:
    arr = np.asarray(batch[key])
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"{what} {key!r}: expected dtype {np.dtype(dtype).name}, got {arr.dtype}")
    if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{what} {key!r}: expected shape {want}, got {list(arr.shape)}")


def _one_of(batch: Mapping[str, Any], options: tuple, what: str) -> str:
    present = [k for k in options if k in batch]
    if len(present) != 1:
        raise ValueError(f"{what}: expected exactly one of {', '.join(options)}, found {present or 'none'}")
    return present[0]


def validate_stage1_batch(batch: Mapping[str, np.ndarray], *, resolution: int | None = None,
                          clip_size: int = 224, vae_scale_factor: int = 8) -> int:
    """Check a stage-1 batch against the contract (module docstring); returns the batch size. Latent moments are
    ``resolution / vae_scale_factor`` on a side (8: SD1.5's VAE; 4: the SynthFace base)."""
    what = "stage-1 batch"
    for options in STAGE1_REQUIRED:
        _one_of(batch, options, what)
    b = int(np.shape(batch["identity"])[0]) if np.ndim(batch["identity"]) == 1 else -1
    if b < 1:
        raise ValueError(f"{what} 'identity': expected int32 [B], got shape {list(np.shape(batch['identity']))}")
    r, f = resolution, int(vae_scale_factor)
    if "target_pixels" in batch:
        _expect(batch, "target_pixels", np.float32, (b, r, r, 3), what)
    else:
        _expect(batch, "target_latent_moments", np.float32,
                (b, None if r is None else r // f, None if r is None else r // f, 8), what)
    if "ref_clip_pixels" in batch:
        _expect(batch, "ref_clip_pixels", np.float32, (b, clip_size, clip_size, 3), what)
    else:
        _expect(batch, "ref_clip_features", np.float32, (b, None, None), what)
    _expect(batch, "ref_id_embedding", np.float32, (b, None), what)
    _expect(batch, "input_ids", np.int32, (b, TOKEN_LENGTH), what)
    _expect(batch, "identity", np.int32, (b,), what)
    return b


def validate_stage2_example(example: Mapping[str, np.ndarray], *, num_targets: int | None = None,
                            resolution: int | None = None, vae_scale_factor: int = 8) -> int:
    """Check a stage-2 element against the contract (module docstring); returns ``T``
    (``vae_scale_factor`` as in :func:`validate_stage1_batch`)."""
    what = "stage-2 example"
    for options in STAGE2_REQUIRED:
        _one_of(example, options, what)
    t = num_targets if num_targets is not None else int(np.shape(example["tgt_index"])[0])
    r, f = resolution, int(vae_scale_factor)
    _expect(example, "src_raster", np.float32, (96, 96, 1), what)
    _expect(example, "tgt_rasters", np.float32, (t, 96, 96, 1), what)
    _expect(example, "src_face_prompt_ids", np.int32, (TOKEN_LENGTH,), what)
    _expect(example, "tgt_face_prompt_ids", np.int32, (t, TOKEN_LENGTH), what)
    if "tgt_pixels" in example:
        _expect(example, "tgt_pixels", np.float32, (t, r, r, 3), what)
    else:
        _expect(example, "tgt_latent_moments", np.float32,
                (t, None if r is None else r // f, None if r is None else r // f, 8), what)
    _expect(example, "src_index", np.int32, (), what)
    _expect(example, "tgt_index", np.int32, (t,), what)
    _expect(example, "identity", np.int32, (), what)
    return t
