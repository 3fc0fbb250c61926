"""A minimal TensorBoard event-file writer (scalars and images) with no TensorFlow or tensorboard dependency.

Event files are TFRecord files of serialised ``tensorflow.Event`` protocol buffers. A record is::

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

(little-endian), where ``masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2³²`` and CRC-32C is the Castagnoli
polynomial. The first record holds ``file_version = "brain.Event:2"``. Only the few protobuf fields we write are
encoded here, by hand:

    Event:          wall_time (1, double), step (2, int64), file_version (3, string), summary (5, Summary)
    Summary:        value (1, repeated Value)
    Summary.Value:  tag (1, string), simple_value (2, float), image (4, Summary.Image)
    Summary.Image:  height (1, int32), width (2, int32), colorspace (3, int32), encoded_image_string (4, bytes)

Files are named ``events.out.tfevents.{time}.{host}.{pid}.{n}`` so TensorBoard picks them up.
"""
from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), table driven
# ---------------------------------------------------------------------------------------------------------
_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Protobuf wire format (the subset we need)
# ---------------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def _event(step: int, *, wall_time: float | None = None, summary: bytes | None = None,
           file_version: str | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time)
    out += _int_field(2, step)
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if summary is not None:
        out += _len_field(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    return _len_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value))


def _image_value(tag: str, image: np.ndarray) -> bytes:
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {tag!r} must be [H, W], [H, W, 1|3|4], got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"image {tag!r} must be uint8, got {img.dtype}")
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    h, w, c = img.shape
    encoded = (_int_field(1, h) + _int_field(2, w) + _int_field(3, c) + _len_field(4, buf.getvalue()))
    return _len_field(1, tag.encode()) + _len_field(4, encoded)


# ---------------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------------
class EventWriter:
    """Append scalars / images to one event file in ``logdir``. Thread-safe; ``flush()`` / ``close()``.

    Construct it only on the process that should write (process 0 in multi-host training)."""

    _counter = 0

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        EventWriter._counter += 1
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{EventWriter._counter}")
        self.path = os.path.join(os.fspath(logdir), name)
        self._file = open(self.path, "ab")
        self._lock = threading.Lock()
        self._write(_event(0, file_version="brain.Event:2"))
        self.flush()

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        record = header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
        with self._lock:
            self._file.write(record)

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """One event holding several scalars (tags like ``"train/loss"``)."""
        if values:
            summary = b"".join(_len_field(1, _scalar_value(t, v)) for t, v in values.items())
            self._write(_event(int(step), wall_time=wall_time, summary=summary))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars(step, {tag: value})

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 ``[H, W, C]`` image (written as PNG)."""
        self._write(_event(int(step), summary=_len_field(1, _image_value(tag, image))))

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                self._file.close()


def read_records(path: str | os.PathLike) -> list[bytes]:
    """The record payloads of an event / TFRecord file, with both CRCs checked (a ``ValueError`` names the
    first bad record)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC in record {len(out)}")
        body = data[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if len(body) != length or dcrc != masked_crc32c(body):
            raise ValueError(f"{path}: bad data CRC in record {len(out)}")
        out.append(body)
        pos += 16 + length
    return out


__all__ = ["EventWriter", "crc32c", "masked_crc32c", "read_records"]
