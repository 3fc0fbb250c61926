"""DynamicID stage 1 → token cache → stage 2 → DynamicID folder, and Infinite-ID, end to end on SynthFace shards.

Everything goes through the real pieces: a small SynthFace world (2 identities) rendered by
``synthface``, its face shards built through the ``synthetic`` analyzer, the Grain loaders, the
stage CLIs (``main(argv)``) and in-process ``run`` functions, ``train.export_dynamicid`` and the two pipelines.
The base is a tiny random SD written by ``StableDiffusion.save_pretrained`` with SynthFace's fixed dimensions:
64×64 images, a 3-level VAE (scale factor 4 → 16×16 latents), the SD1.5 tokenizer (vocab 49408, eos 49407) and
text width = cross-attention width = 64. Steps are few: these tests check the wiring, resume and the formats, not
what the models learn."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import loaders as L
from dynamicid_jax.faces.kdef_grid import grid_face_prompt
import synthface as sf
from train import runs

from synthface_training import (HAPPY, IID, STAGE1, STAGE2, stage_args, reference_image, base, mesh1,  # noqa: F401
                                stage1_run, stage2_export, world)  # (the shared run's fixtures)
from tiny_synthface import EMBED, NoFaces, ReferenceFace, random_state


# ------------------------------------------------------------------------------------------------ configs
def test_synthface_configs_fit_their_stages():
    """The three SynthFace configs load under their stage's defaults, with SynthFace's widths (64), the 128-d
    synthetic embeddings and 64×64 images."""
    from train import infinite_id, stage1, stage2

    c1 = stage1.load("train/configs/synthface_stage1.yaml", ["workdir=/tmp/x"])
    c2 = stage1.load("train/configs/synthface_stage2.yaml", ["workdir=/tmp/x"], defaults=stage2.DEFAULTS)
    ci = stage1.load("train/configs/synthface_infinite_id.yaml", ["workdir=/tmp/x"], defaults=infinite_id.DEFAULTS)
    assert c1.model.id_encoder_overrides == {"id_embed_dim": 128, "dim": 64, "clip_dim": 64}
    assert ci.model.encoder_overrides["id_embed_dim"] == 128 and ci.model.encoder_overrides["dim"] == 64
    assert c2.model.imr_overrides == {"embedding_dim": 64, "txt_dim": 64}
    assert c1.data.resolution == c2.data.resolution == ci.data.resolution == 64
    assert c1.model.image_encoder == ci.model.image_encoder == "random:tiny"
    assert 0 < c2.data.grid_prompt_fraction <= 1 and c1.optimizer.lr > 0 and c2.train.steps > 0


# ------------------------------------------------------------------------------------------------ image encoder
def test_save_image_encoder_round_trip(tmp_path, torch):
    """Our folder format is transformers' CLIPVisionModelWithProjection: both loaders read it back, same outputs."""
    import flax.linen as nn
    from transformers import CLIPVisionModelWithProjection as TorchCLIP

    from dynamicid_jax.models import clip

    module = clip.CLIPVisionModelWithProjection(clip.vision_config("tiny"))
    params = nn.meta.unbox(module.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))["params"])
    folder = clip.save_image_encoder(str(tmp_path / "ie"), module, params)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "clip_vision_model"
    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want = module.apply({"params": params}, pixels)
    ours, ours_params = clip.load_image_encoder(folder)
    got = ours.apply({"params": ours_params}, pixels)
    assert ours.config == module.config
    np.testing.assert_allclose(got.hidden_states[-2], want.hidden_states[-2], atol=1e-5)
    ref = TorchCLIP.from_pretrained(folder).eval()
    with torch.no_grad():
        out = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    np.testing.assert_allclose(out.hidden_states[-2].numpy(), want.hidden_states[-2], atol=1e-5)
    np.testing.assert_allclose(out.image_embeds.numpy(), want.image_embeds, atol=1e-5)
    other = nn.meta.unbox(module.init(jax.random.key(4), jnp.zeros((1, 32, 32, 3)))["params"])
    clip.save_image_encoder(folder, module, other)  # replaces the folder
    again = clip.load_image_encoder(folder)[1]
    np.testing.assert_array_equal(again["visual_projection"]["kernel"], other["visual_projection"]["kernel"])
    with pytest.raises(TypeError, match="CLIPVisionModelWithProjection"):
        clip.save_image_encoder(str(tmp_path / "x"), clip.CLIPTextModel(clip.text_config("tiny")), params)


# ------------------------------------------------------------------------------------------------ grid prompts
def _records(shards):
    from data_pipelines.schema import decode_record
    from data_pipelines.shards import open_shards

    data = open_shards(shards)
    return [decode_record(data.source[i]) for i in range(len(data))]


def test_grid_face_prompt_matches_the_sidecars(world):
    """The loader's grid prompt of every record is exactly the SynthFace sidecar's ``grid_prompt``."""
    records = _records(world["shards"])
    assert len(records) == 70
    for rec in records:
        with open(os.path.join(world["data"], "train", os.path.splitext(rec.key)[0] + ".json")) as f:
            sidecar = json.load(f)
        assert grid_face_prompt(rec.expression, rec.pose) == sidecar["grid_prompt"]
        assert rec.face_prompt == sidecar["face_prompt"]
    assert grid_face_prompt(None, (0.0, 0.0, 0.0)) is None
    want = "the expression is surprised, the face is slightly turned to the right"
    assert grid_face_prompt("surprise", (0.0, 30.0)) == want


def test_stage2_loader_grid_prompt_fraction(world):
    """``grid_prompt_fraction``: 0 → the records' face prompts, 1 → grid prompts for source and targets, 0.5 →
    both; the sampled records do not depend on it."""
    from dynamicid_jax.tokenizer import load_tokenizer, tokenize

    records = _records(world["shards"])
    tok = load_tokenizer(None)

    def take(fraction, n=16):
        conf = L.Stage2Config(num_targets=3, resolution=64, clip_size=32, seed=5, read_threads=1,
                              grid_prompt_fraction=fraction, process_index=0, process_count=1)
        it = iter(L.stage2_loader(world["shards"], conf))
        return [next(it) for _ in range(n)]

    plain, grid, half = take(0.0), take(1.0), take(0.5)
    for a, b, c in zip(plain, grid, half):
        for k in ("src_index", "tgt_index", "tgt_rasters"):
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], c[k])
    for ex, kind in ((plain[0], "plain"), (grid[0], "grid")):
        src = records[int(ex["src_index"])]
        text = src.face_prompt if kind == "plain" else grid_face_prompt(src.expression, src.pose)
        np.testing.assert_array_equal(ex["src_face_prompt_ids"], tokenize(tok, [text])[0])
        tgt = [records[int(i)] for i in ex["tgt_index"]]
        texts = [r.face_prompt if kind == "plain" else grid_face_prompt(r.expression, r.pose) for r in tgt]
        np.testing.assert_array_equal(ex["tgt_face_prompt_ids"], tokenize(tok, texts))
    assert not any(bool(e["grid_prompt"]) for e in plain) and all(bool(e["grid_prompt"]) for e in grid)
    assert 0 < sum(bool(e["grid_prompt"]) for e in half) < len(half)
    with pytest.raises(ValueError, match="grid_prompt_fraction"):
        L.Stage2Config(grid_prompt_fraction=1.5)


# ------------------------------------------------------------------------------------------------ stage 1 runs
def test_stage1_export_carries_what_the_later_steps_need(stage1_run):
    from dynamicid_jax.models.clip import load_image_encoder
    from train import runs, stage1

    meta = runs.export_metadata(stage1_run["export"])
    assert meta["format"] == stage1.EXPORT_FORMAT and meta["step"] == "1"
    assert json.loads(meta["id_encoder_config"])["id_embed_dim"] == EMBED
    assert json.loads(meta["saa"])["lora_rank"] == 4
    assert json.loads(meta["unet_config"])["cross_attention_dim"] == 64
    assert meta["image_encoder"] == os.path.join(stage1_run["workdir"], "export", "image_encoder")
    module, _ = load_image_encoder(meta["image_encoder"])
    assert module.config.hidden_size == 64
    assert set(runs.load_params(stage1_run["export"])) == {"id_encoder", "saa"}
    assert os.path.isfile(os.path.join(stage1_run["workdir"], "run.json"))


def test_rerun_skips_resumes_and_guards_the_workdir(world, base, stage1_run, mesh1, tmp_path, monkeypatch):
    """A finished run returns at once (the CLI too); more steps resume from the last checkpoint; other settings
    in the same workdir are an error unless on_change=restart, which trains from scratch."""
    import shutil

    from train import loop, runs, stage1

    workdir = str(tmp_path / "w1")
    shutil.copytree(stage1_run["workdir"], workdir)
    args = STAGE1 + stage_args(world, base, workdir) + ["train.steps=1"]
    stamp = os.stat(os.path.join(workdir, "export", "stage1.safetensors")).st_mtime_ns

    class NoTraining:
        def __init__(self, *a, **k):
            raise AssertionError("a finished run must not build a trainer")

    monkeypatch.setattr(loop, "Trainer", NoTraining)
    assert stage1.main(["--config", "train/configs/synthface_stage1.yaml", *args]) == 0
    assert os.stat(os.path.join(workdir, "export", "stage1.safetensors")).st_mtime_ns == stamp
    monkeypatch.undo()

    steps = []
    real_step = loop.Trainer.train_step
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self, s, b: steps.append(1) or real_step(self, s, b))
    loaded = {"mesh": mesh1, "base": runs.load_base(base, jnp.float32),  # loaded once for the runs below
              "image_encoder": runs.load_image_encoder("random:tiny", jnp.float32)}
    path = stage1.run("train/configs/synthface_stage1.yaml", args[:-1] + ["train.steps=2"], **loaded)
    assert len(steps) == 1 and runs.export_metadata(path)["step"] == "2"  # resumed at step 1

    with pytest.raises(runs.RunMismatchError, match="data.seed"):
        stage1.run("train/configs/synthface_stage1.yaml", args[:-1] + ["train.steps=2", "data.seed=1"], **loaded)
    steps.clear()
    stage1.run("train/configs/synthface_stage1.yaml", args[:-1] + ["train.steps=2", "data.seed=1", "on_change=restart"],
               **loaded)
    assert len(steps) == 2  # from scratch


# ------------------------------------------------------------------------------------------------ wrong inputs
def test_wrong_inputs_give_clear_errors(world, base, stage1_run, tmp_path):
    from data_pipelines.build_shards import build_shards
    from train import export_dynamicid, stage1, stage2, token_cache

    cfg1 = "train/configs/synthface_stage1.yaml"
    w = str(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        stage2.run("train/configs/synthface_stage2.yaml", STAGE2 + stage_args(world, base, w) + ["model.stage1=/nope.st"])
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        token_cache.main(["--config", "train/configs/synthface_stage2.yaml", *STAGE2, *stage_args(world, base, w),
                          "model.stage1=" + str(tmp_path / "missing.safetensors")])
    with pytest.raises(FileNotFoundError, match="not a face-shard folder"):
        stage1.run(cfg1, STAGE1 + stage_args(world, base, w) + [f"data.shards={world['data']}"])
    with pytest.raises(ValueError, match="32-d face embeddings"):
        stage1.run(cfg1, STAGE1 + stage_args(world, base, w) + ["model.id_encoder_overrides={id_embed_dim: 128, dim: 64, "
                                                           "clip_dim: 64}"])
    os.makedirs(tmp_path / "blank" / "id00000")
    from PIL import Image

    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "blank" / "id00000" / "a.png")
    build_shards(str(tmp_path / "blank"), str(tmp_path / "no_faces"), NoFaces(), resolution=64, progress=False)
    with pytest.raises(ValueError, match="no face records"):
        stage1.run(cfg1, STAGE1 + stage_args(world, base, w) + [f"data.shards={tmp_path / 'no_faces'}"])
    with pytest.raises(ValueError, match="workdir"):
        stage1.run(cfg1, STAGE1 + [f"model.base={base}", f"data.shards={world['shards']}"])
    with pytest.raises(FileNotFoundError, match="stage1 export"):
        export_dynamicid.export_dynamicid(str(tmp_path / "none.safetensors"), None, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="not a stage2 export"):  # a stage-1 file given as stage 2
        export_dynamicid.export_dynamicid(stage1_run["export"], stage1_run["export"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="clip_size"):
        stage1.Stage1(stage1.load(cfg1, STAGE1 + stage_args(world, base, w) + ["data.clip_size=224"]))
    with pytest.raises(ValueError, match="LoRA rank 4"):
        stage2.Stage2(stage1.load("train/configs/synthface_stage2.yaml", STAGE2 + stage_args(world, base, w) + [
            f"model.stage1={stage1_run['export']}", "model.lora_rank=8"], defaults=stage2.DEFAULTS))


def test_token_cache_holds_the_stage1_tokens_and_is_reused(world, stage1_run, stage2_export):
    from train import runs, token_cache
    from train.runs import export_metadata

    folder = os.path.join(stage2_export["workdir"], "token_cache")
    cache = token_cache.TokenCache.load(folder)
    assert cache.present.all() and cache.tokens.shape == (70, 4, 64)
    # record 0's tokens = the stage-1 encoder on its embedding and CLIP pixels
    from data_pipelines.schema import decode_record
    from data_pipelines.shards import open_shards
    from dynamicid_jax.methods import id_encoder as ide
    from dynamicid_jax.models.clip import clip_preprocess, load_image_encoder

    meta = export_metadata(stage1_run["export"])
    rec = decode_record(open_shards(world["shards"]).source[0])
    vision, vparams = load_image_encoder(meta["image_encoder"])
    enc = ide.IDEncoder(ide.IDEncoderConfig.from_dict(json.loads(meta["id_encoder_config"])))
    feats = vision.apply({"params": vparams}, clip_preprocess(rec.decode_image(), size=32)).hidden_states[-2]
    want = enc.apply({"params": runs.load_params(stage1_run["export"])["id_encoder"]}, rec.embedding[None], feats)
    np.testing.assert_allclose(cache.tokens[0], np.asarray(want)[0], atol=1e-4)
    part = os.path.join(folder, "tokens.p0-of-1.safetensors")
    stamp = os.stat(part).st_mtime_ns
    token_cache.run("train/configs/synthface_stage2.yaml", stage2_export["args"])  # same inputs → reused
    assert os.stat(part).st_mtime_ns == stamp


def test_dynamicid_folder_from_the_exports_generates(world, base, stage1_run, stage2_export, tmp_path):
    """``train.export_dynamicid`` → a folder (with ``image_encoder/``) that ``DynamicIDPipeline.from_pretrained``
    loads with the synthetic analyzer; it generates, and a face prompt edits the identity through the IMR."""
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline, load_dynamicid
    from train import export_dynamicid

    out = str(tmp_path / "dynamicid")
    assert export_dynamicid.main(["--stage1", stage1_run["export"], "--stage2", stage2_export["export"],
                                  "--out", out]) == 0
    assert os.path.isdir(os.path.join(out, "image_encoder")) and load_dynamicid(out).has_imr
    pipe = DynamicIDPipeline.from_pretrained(base, out, analyzer="synthetic",
                                             analyzer_kwargs={"root": world["models"]})  # the CLI form
    ref = reference_image(world)
    pipe.analyzer = ReferenceFace(pipe.analyzer, ref)  # the pipeline analyses pixels: no detector in this world
    kw = dict(height=64, width=64, steps=2, seed=0)
    image = pipe("a photo of a person", references=[ref], **kw)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
    edited = pipe("a photo of a person", references=[ref], face_prompts=[HAPPY], **kw)
    plain = pipe.encode_identities([ref])
    tokens = pipe.encode_identities([ref], ["in a happy expression, in front view"])
    assert edited.shape == image.shape and not np.allclose(np.asarray(plain), np.asarray(tokens))
    stage1_only = export_dynamicid.export_dynamicid(stage1_run["export"], None, str(tmp_path / "no_imr"))
    assert not load_dynamicid(stage1_only).has_imr


def test_infinite_id_export_loads_into_the_pipeline(world, base, tmp_path):
    """The Infinite-ID export folder (weights + ``image_encoder/`` + ``train.json``) loads into
    ``InfiniteIDPipeline`` with the synthetic analyzer (generation: the slow end-to-end test)."""
    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline
    from train import infinite_id

    from train.stage1 import load

    workdir = str(tmp_path / "wi")
    cfg = load("train/configs/synthface_infinite_id.yaml", IID + stage_args(world, base, workdir),
               defaults=infinite_id.DEFAULTS)
    stage = infinite_id.InfiniteIDStage(cfg)
    stage.export(random_state(stage.task()), workdir, fingerprint="f")
    folder = os.path.join(workdir, "export")
    with open(os.path.join(folder, "train.json")) as f:
        assert json.load(f)["fingerprint"] == "f"
    pipe = InfiniteIDPipeline.from_pretrained(base, folder, os.path.join(folder, "image_encoder"),
                                              face_analyzer="synthetic",
                                              analyzer_kwargs={"models_dir": world["models"]})
    pipe.analyzer = ReferenceFace(pipe.analyzer, reference_image(world))
    embeds, pixels = pipe.reference_inputs([reference_image(world)])
    assert embeds.shape == (1, EMBED) and pixels.shape == (1, 32, 32, 3)


# ------------------------------------------------------------------------------------------------ the whole chain
@pytest.mark.slow
def test_clis_end_to_end_on_synthface(world, base, tmp_path):
    """``python -m train.stage1`` → ``train.stage2`` (building its token cache) → ``train.export_dynamicid`` →
    ``DynamicIDPipeline`` (one identity, two, an IMR edit), and ``python -m train.infinite_id`` →
    ``InfiniteIDPipeline``, each stage's CLI with two steps on all devices, sample grids included; reruns skip."""
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline
    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline
    from train import export_dynamicid, infinite_id, stage1, stage2

    w1, w2, wi, out = (str(tmp_path / n) for n in ("w1", "w2", "wi", "dynamicid"))
    sample = ["train.sample_every=2", "sample.steps=2"]
    args1 = ["--config", "train/configs/synthface_stage1.yaml", *STAGE1, *stage_args(world, base, w1), *sample]
    assert stage1.main(args1) == 0
    assert os.listdir(os.path.join(w1, "samples"))
    export1 = os.path.join(w1, "export", "stage1.safetensors")
    args2 = ["--config", "train/configs/synthface_stage2.yaml", *STAGE2, *stage_args(world, base, w2),
             f"model.stage1={export1}"]
    assert stage2.main(args2) == 0
    export2 = os.path.join(w2, "export", "stage2.safetensors")
    assert runs.export_metadata(export2)["step"] == "2"
    assert os.path.isfile(os.path.join(w2, "token_cache", "cache.json"))
    stamps = [os.stat(p).st_mtime_ns for p in (export1, export2)]
    assert stage1.main(args1) == 0 and stage2.main(args2) == 0  # finished: nothing retrains
    assert [os.stat(p).st_mtime_ns for p in (export1, export2)] == stamps
    assert export_dynamicid.main(["--stage1", export1, "--stage2", export2, "--out", out]) == 0

    pipe = DynamicIDPipeline.from_pretrained(base, out, analyzer="synthetic",
                                             analyzer_kwargs={"models_dir": world["models"]})
    r1, r2 = reference_image(world), reference_image(world, image="happy_slight-left")
    pipe.analyzer = ReferenceFace(pipe.analyzer, r1, r2)
    kw = dict(height=64, width=64, steps=3, seed=0)
    one = pipe("a photo of a person", references=[r1], **kw)
    two, gates = pipe("a photo of two people", references=[r1, r2], return_gates=True, **kw)
    edit = pipe("a photo of a person", references=[r1], face_prompts=[HAPPY], **kw)
    for im in (one, two, edit):
        assert im.shape == (1, 64, 64, 3) and im.dtype == np.uint8
    assert gates.num_ids == 2 and gates.maps

    argsi = ["--config", "train/configs/synthface_infinite_id.yaml", *IID, *stage_args(world, base, wi), *sample,
             "sample.count=1"]
    assert infinite_id.main(argsi) == 0
    folder = os.path.join(wi, "export")
    assert os.listdir(os.path.join(wi, "samples"))
    stamp = os.stat(os.path.join(folder, "infinite_id.safetensors")).st_mtime_ns
    assert infinite_id.main(argsi) == 0
    assert os.stat(os.path.join(folder, "infinite_id.safetensors")).st_mtime_ns == stamp
    ipipe = InfiniteIDPipeline.from_pretrained(base, folder, os.path.join(folder, "image_encoder"),
                                               face_analyzer="synthetic",
                                               analyzer_kwargs={"models_dir": world["models"]})
    ipipe.analyzer = ReferenceFace(ipipe.analyzer, r1)
    image = ipipe("a photo of a person", references=[r1], height=64, width=64, steps=3, seed=0)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ corrupt shards
def _scalar_values(tb_dir: str, tag: str) -> list[float]:
    """Every value of scalar ``tag`` in the event files under ``tb_dir`` (Summary.Value tag + simple_value)."""
    import struct

    from train.tensorboard import read_records

    key = b"\x0a" + bytes([len(tag)]) + tag.encode() + b"\x15"
    out = []
    for name in sorted(os.listdir(tb_dir)):
        for rec in read_records(os.path.join(tb_dir, name)):
            at = rec.find(key)
            if at >= 0:
                out.append(struct.unpack("<f", rec[at + len(key):at + len(key) + 4])[0])
    return out


def _corrupt_records(shards: str, dst: str, offsets: list[int]) -> str:
    """A copy of ``shards`` with junk written over the given byte offsets of its first shard file (each offset
    inside one record's chunk: that record becomes unreadable, the others stay readable)."""
    import shutil

    shutil.copytree(shards, dst)
    name = sorted(n for n in os.listdir(dst) if n.endswith(".array_record"))[0]
    path = os.path.join(dst, name)
    data = bytearray(open(path, "rb").read())
    junk = np.random.default_rng(0).integers(0, 256, 48, dtype=np.uint8).tobytes()
    for off in offsets:
        data[off:off + len(junk)] = junk
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


@pytest.mark.slow  # two stage-1 runs (compile included): about a minute on an idle 2-core CPU
def test_training_survives_corrupt_records_and_stops_above_the_budget(world, base, mesh1, tmp_path, caplog):
    """A stage-1 run over a shard with unreadable records finishes, logging the skipped count and writing
    data/skipped_records to TensorBoard; with a zero budget the same data stops the run with a message naming
    the shard file, the checkpoints of the steps done are kept, and nothing is exported."""
    import logging

    from data_pipelines.loaders import CorruptDataError
    from data_pipelines.shards import open_shards
    from train import runs, stage1

    clean = open_shards(world["shards"])
    bad = str(tmp_path / "shards_bad")
    first = sorted(n for n in os.listdir(world["shards"]) if n.endswith(".array_record"))[0]
    step = max(64, os.path.getsize(os.path.join(world["shards"], first)) // 40)
    path = _corrupt_records(world["shards"], bad, [64 + k * step for k in (1, 2, 3)])  # three spots of junk
    data = open_shards(bad)
    broken = []
    for i in range(len(data)):
        try:
            data.source[i]
        except Exception as err:  # noqa: BLE001 - the test wants to see which records the junk hit
            broken.append(i)
            assert os.path.basename(path) in str(err) and type(err).__name__ == "CorruptRecordError"
    assert 1 <= len(broken) < len(clean) // 4, broken
    loaded = {"mesh": mesh1, "base": runs.load_base(base, jnp.float32),
              "image_encoder": runs.load_image_encoder("random:tiny", jnp.float32)}
    workdir = str(tmp_path / "w")
    caplog.set_level(logging.INFO)
    args = STAGE1 + [f"model.base={base}", f"data.shards={bad}", f"workdir={workdir}", "train.steps=12",
                     "data.max_corrupt_fraction=0.5", "data.corrupt_grace=8", "data.distinct_reference=false"]
    out = stage1.run("train/configs/synthface_stage1.yaml", args, **loaded)
    assert os.path.isfile(out)
    skipped = _scalar_values(os.path.join(workdir, "tb"), "data/skipped_records")
    assert skipped and skipped[-1] >= 1, skipped
    assert any("corrupt records skipped" in r.getMessage() for r in caplog.records)

    strict = str(tmp_path / "w_strict")
    args = [a.replace(workdir, strict) if a.startswith("workdir=") else a for a in args]
    args = [a for a in args if not a.startswith("data.max_corrupt_fraction")] + ["data.max_corrupt_fraction=0"]
    with pytest.raises(CorruptDataError, match=os.path.basename(path)):
        stage1.run("train/configs/synthface_stage1.yaml", args, **loaded)
    assert not os.path.exists(os.path.join(strict, "export", "stage1.safetensors"))
    events = _scalar_values(os.path.join(strict, "tb"), "train/loss") if os.path.isdir(os.path.join(strict, "tb")) \
        else []
    if events:  # steps were done before the bad record came: their checkpoint is kept
        assert os.listdir(os.path.join(strict, "checkpoints"))
