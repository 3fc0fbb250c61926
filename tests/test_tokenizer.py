"""The offline SD1.5 CLIP tokenizer: vocabulary construction, ids, padding / truncation, the cache, errors.

Expected ids were produced once with OpenCLIP's own ``SimpleTokenizer`` (open-clip-torch 3.3.0, the reference
implementation of this vocabulary) and are fixed here, so the tests need no extra package.
"""
import hashlib
import os
import pathlib
import shutil

import numpy as np
import pytest

from dynamicid_jax import tokenizer as tk

BOS, EOS = 49406, 49407

# prompt → BPE ids without special tokens (OpenCLIP SimpleTokenizer.encode)
REFERENCE = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A portrait of a Woman, smiling; 4k photo!!": [320, 5352, 539, 320, 2308, 267, 9200, 282, 275, 330, 1125, 748],
    "an astronaut riding a horse on mars": [550, 18376, 6765, 320, 4558, 525, 7496],
    "it's the dog's ball, isn't it?": [585, 568, 518, 1929, 568, 1069, 267, 2923, 713, 585, 286],
    "  multiple   spaces\tand\nnewlines ": [6470, 9006, 537, 1218, 3418],
    "café naïve résumé": [15304, 1097, 35689, 563, 29106, 7054, 4166],
    "sks person, 1990s film grain, 35mm": [48136, 2533, 267, 272, 280, 280, 271, 338, 1860, 12109, 267, 274, 276,
                                           2848],
}
LONG_PROMPT = (
    "photorealistic close-up portrait of a man with a beard, wearing a red jacket, in a snowy forest at dawn, "
    "cinematic lighting, highly detailed skin texture, shallow depth of field, bokeh, 85mm lens, award winning "
    "photograph, trending on artstation, volumetric fog, golden hour, ultra sharp focus, masterpiece, best "
    "quality, 8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3")
LONG_IDS = [
    1153, 16157, 2660, 268, 705, 5352, 539, 320, 786, 593, 320, 9052, 267, 3309, 320, 736, 6164, 267, 530, 320,
    14191, 4167, 536, 7689, 267, 25602, 5799, 267, 5302, 12609, 3575, 16505, 267, 23730, 10350, 539, 1570, 267, 647,
    36983, 267, 279, 276, 2848, 8666, 267, 2047, 2577, 8853, 267, 6087, 525, 1486, 2631, 267, 3563, 19950, 9417,
    267, 3878, 2232, 267, 8118, 8157, 4353, 267, 12066, 267, 949, 3027, 267, 279, 330, 84, 4414, 267, 33740, 267,
    3773, 5799, 267, 1400, 3027, 267, 1860, 12109, 267, 24765, 1052, 274]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.fixture(scope="session")
def tokenizer(cache_dir):
    return tk.load_tokenizer(cache_dir=cache_dir)


def _padded(ids):
    row = [BOS, *ids, EOS]
    return row + [EOS] * (77 - len(row))


def test_a_photo_of_a_cat(tokenizer):
    ids = tk.tokenize(tokenizer, "a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == EOS).all()


def test_matches_openclip_reference_batch(tokenizer):
    prompts = list(REFERENCE)
    ids = tk.tokenize(tokenizer, prompts)
    assert ids.shape == (len(prompts), 77)
    for row, prompt in zip(ids, prompts, strict=True):
        assert row.tolist() == _padded(REFERENCE[prompt]), prompt


def test_truncation_keeps_bos_and_eos(tokenizer):
    untruncated = tokenizer(LONG_PROMPT)["input_ids"]
    assert untruncated == [BOS, *LONG_IDS, EOS]
    ids = tk.tokenize(tokenizer, [LONG_PROMPT, "a photo of a cat"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [BOS, *LONG_IDS[:75], EOS]
    assert ids[1].tolist() == _padded(REFERENCE["a photo of a cat"])


def test_vocabulary_layout():
    table = tk.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")] and table[ord(" ")] == chr(256 + 32)
    merges = tk.read_bpe_merges(tk._asset_path())
    vocab = tk.build_clip_vocab(merges)
    assert len(merges) == 48894 and len(vocab) == tk.VOCAB_SIZE == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512  # first merge is "i n"
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


def test_tokenizer_config(tokenizer):
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert len(tokenizer) == 49408


def test_cache_is_reused_and_repaired(cache_dir, tokenizer):
    folder = tk.default_tokenizer_dir(cache_dir)
    assert folder.parent == pathlib.Path(cache_dir)
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert tk.default_tokenizer_dir(cache_dir) == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp  # not rewritten
    assert not [p for p in pathlib.Path(cache_dir).iterdir() if p.name.startswith(".tmp")]
    # a damaged cache entry is rebuilt
    broken = pathlib.Path(cache_dir) / "broken"
    shutil.copytree(folder, broken / folder.name)
    (broken / folder.name / "merges.txt").unlink()
    rebuilt = tk.default_tokenizer_dir(broken)
    assert (rebuilt / "merges.txt").is_file()
    assert tk.tokenize(tk.load_tokenizer(cache_dir=broken), "a photo of a cat")[0, :7].tolist() == \
        [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMICID_JAX_CACHE", str(tmp_path / "env_cache"))
    assert tk.default_cache_dir() == tmp_path / "env_cache"


def test_load_from_folder_and_pipeline_root(cache_dir, tmp_path):
    root = tmp_path / "pipeline"
    shutil.copytree(tk.default_tokenizer_dir(cache_dir), root / "tokenizer")
    for path in (root / "tokenizer", root, str(root)):
        tok = tk.load_tokenizer(path)
        assert tk.tokenize(tok, "an astronaut riding a horse on mars")[0].tolist() == \
            _padded(REFERENCE["an astronaut riding a horse on mars"])


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="only local folders"):
        tk.load_tokenizer("openai/clip-vit-large-patch14")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        tk.load_tokenizer(tmp_path / "half")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        tk.load_tokenizer(tmp_path / "file.txt")


def test_bad_prompts(tokenizer):
    with pytest.raises(ValueError, match="prompts"):
        tk.tokenize(tokenizer, [])
    with pytest.raises(ValueError, match="prompts"):
        tk.tokenize(tokenizer, ["ok", 3])


def test_asset_and_notice_ship_together():
    asset = tk._asset_path()
    notice = (asset.parent / "NOTICE.md").read_text(encoding="utf-8")
    assert hashlib.sha256(asset.read_bytes()).hexdigest() in notice
    assert "MIT License" in notice and "OpenAI" in notice
    assert os.path.getsize(asset) > 1_000_000


def test_folder_saved_by_transformers5_with_only_tokenizer_json(tmp_path):
    from dynamicid_jax.tokenizer import load_tokenizer, tokenize

    load_tokenizer().save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    ids = tokenize(load_tokenizer(str(tmp_path)), "a photo of a cat")[0]
    assert list(ids[:7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
