"""The CLIP tokenizer of Stable Diffusion 1.x: a ``transformers.CLIPTokenizer`` loaded from a folder.

Two sources:

* ``load_tokenizer(folder)`` — a diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt`` and usually a
  ``tokenizer_config.json``), or a pipeline root that contains one;
* ``load_tokenizer()`` — an offline default rebuilt from the CLIP BPE merge list shipped in
  ``dynamicid_jax/assets/bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence; see ``assets/NOTICE.md``). The
  vocabulary is laid out exactly as the original CLIP tokenizer lays it out, which gives the same 49,408 ids as
  ``openai/clip-vit-large-patch14``. The generated folder is written once into a cache directory.

Tokenizers are always constructed through ``CLIPTokenizer.from_pretrained`` (the constructor's signature changed
in transformers 5; the folder format did not).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import and only the tokenizer needs it
    from transformers import CLIPTokenizer

BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
SDXL_PAD_TOKEN = "!"  # SDXL's tokenizer_2 (OpenCLIP's tokenizer) pads with "!" (id 0) instead of EOS
# The original CLIP tokenizer keeps merge lines 1 .. 48894 (line 0 is a header): 49152 - 256 - 2 merges, so that
# 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


# The SD1.5 ``tokenizer/tokenizer_config.json`` essentials (openai/clip-vit-large-patch14's tokenizer).
_TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MAX_LENGTH,
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "do_lower_case": True,
    "add_prefix_space": False,
    "errors": "replace",
}
_SPECIAL_TOKENS_MAP = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte → printable-character table, in CLIP's vocabulary order.

    Bytes that are already printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves and come first;
    the remaining 68 bytes (controls, space, …) follow in ascending order, mapped to ``chr(256 + n)``.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_bpe_merges(bpe_gz: str | os.PathLike) -> list[str]:
    """The ``NUM_MERGES`` merge rules (``"a b"`` strings) of a CLIP ``bpe_simple_vocab_16e6.txt.gz`` file."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} is not a CLIP BPE merge list: expected {NUM_MERGES} lines of two symbols "
                         f"after the header line")
    return merges


def build_clip_vocab(merges: Sequence[str]) -> dict[str, int]:
    """The CLIP vocabulary: bytes, bytes + ``</w>``, every merge joined, then the two special tokens."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the BPE merge list produced duplicate vocabulary entries")
    return vocab


def _asset_path() -> pathlib.Path:
    path = pathlib.Path(str(importlib.resources.files("dynamicid_jax") / "assets" / BPE_ASSET))
    if not path.is_file():
        raise FileNotFoundError(f"the packaged CLIP vocabulary {path} is missing; reinstall dynamicid-jax "
                                f"(it ships dynamicid_jax/assets/{BPE_ASSET})")
    return path


def default_cache_dir() -> pathlib.Path:
    """``$DYNAMICID_JAX_CACHE`` or ``$XDG_CACHE_HOME/dynamicid_jax`` (default ``~/.cache/dynamicid_jax``)."""
    if os.environ.get("DYNAMICID_JAX_CACHE"):
        return pathlib.Path(os.environ["DYNAMICID_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "dynamicid_jax"


def _is_complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in _TOKENIZER_FILES)


def default_tokenizer_dir(cache_dir: str | os.PathLike | None = None, *,
                          pad_token: str = EOS_TOKEN) -> pathlib.Path:
    """Build (once) and return the folder of the offline default SD1.5 tokenizer (``pad_token=SDXL_PAD_TOKEN``:
    SDXL's ``tokenizer_2``, the same vocabulary and merges with ``"!"`` as padding).

    The folder name carries a hash of the packaged BPE file, and it is written atomically (a temporary folder
    renamed into place), so concurrent processes and interrupted writes never leave a half-written tokenizer.
    """
    asset = _asset_path()
    digest = hashlib.sha256(asset.read_bytes()).hexdigest()[:16]
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if pad_token not in (EOS_TOKEN, SDXL_PAD_TOKEN):
        raise ValueError(f"pad_token must be {EOS_TOKEN!r} (SD1.5, SDXL tokenizer) or {SDXL_PAD_TOKEN!r} (SDXL "
                         f"tokenizer_2), got {pad_token!r}")
    suffix = "" if pad_token == EOS_TOKEN else "-pad-exclam"
    folder = root / f"clip_tokenizer{suffix}-{digest}"
    if _is_complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    merges = read_bpe_merges(asset)
    vocab = build_clip_vocab(merges)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-clip_tokenizer-", dir=root))
    from dynamicid_jax.file_io import dir_mode

    os.chmod(tmp, dir_mode())  # mkdtemp creates 0700; the cache may be shared: give it mkdir's mode
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps({**_TOKENIZER_CONFIG, "pad_token": pad_token},
                                                              indent=2), encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps({**_SPECIAL_TOKENS_MAP, "pad_token": pad_token},
                                                                indent=2), encoding="utf-8")
        if folder.exists() and not _is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)  # a broken leftover (files deleted by hand)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # not a lost race with another writer: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _resolve_tokenizer_folder(path: str | os.PathLike) -> pathlib.Path:
    folder = pathlib.Path(path).expanduser()
    if not folder.exists():
        from dynamicid_jax.weights.keymap import missing_path_error

        raise missing_path_error(path, "tokenizer", "a folder with vocab.json and merges.txt, e.g. a diffusers "
                                                    "pipeline's tokenizer/")
    if not folder.is_dir():
        raise ValueError(f"tokenizer path {folder} is a file; expected a folder with vocab.json and merges.txt")

    def complete(f: pathlib.Path) -> bool:  # slow files (SD1.5 folders) or a fast tokenizer.json (transformers 5)
        return ((f / "vocab.json").is_file() and (f / "merges.txt").is_file()) or (f / "tokenizer.json").is_file()

    if not complete(folder) and complete(folder / "tokenizer"):
        folder = folder / "tokenizer"  # a diffusers pipeline root
    if not complete(folder):
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)} (expected the files of a "
                                f"CLIPTokenizer: vocab.json + merges.txt, or tokenizer.json)")
    return folder


def load_tokenizer(path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                   pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
    """A ``transformers.CLIPTokenizer`` from a local folder, or the offline SD1.5 default when ``path`` is None
    (``pad_token=SDXL_PAD_TOKEN``: SDXL's ``tokenizer_2``; ignored when ``path`` is given)."""
    from transformers import CLIPTokenizer

    folder = (default_tokenizer_dir(cache_dir, pad_token=pad_token) if path is None
              else _resolve_tokenizer_folder(path))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer: "CLIPTokenizer", prompts: str | Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Token ids ``int32 [B, max_length]``: BOS, tokens (truncated), EOS, then padding with the pad token."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty sequence of strings, got {prompts!r}")
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int32)
