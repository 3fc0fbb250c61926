"""SDXL for training: the sharding rules place every SDXL param (full size, abstract), tokenizer 2's ids follow
from tokenizer 1's, and DynamicID's stage 1 / stage 2 build and train on the tiny SDXL folder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dynamicid_jax import sharding as sh
from dynamicid_jax.methods import saa as saa_lib
from dynamicid_jax.models import clip as C
from dynamicid_jax.models import unet as U
from train import loop, runs, stage1, stage2
from train.config import load_config

TINY1 = ["model.image_encoder=random:tiny", "model.id_encoder_variant=tiny-sdxl", "model.lora_rank=4",
         "model.dtype=float32", "train.progress_bar=false", "train.log_every=1", "checkpoint.every=0"]
TINY2 = ["model.imr_variant=tiny-sdxl", "model.keypoint_variant=tiny-sdxl", "model.id_encoder_variant=tiny-sdxl",
         "model.lora_rank=4", "model.dtype=float32", "train.progress_bar=false", "train.log_every=1",
         "checkpoint.every=0"]


def test_full_size_sdxl_shapes_and_rules_place_every_param(torch):
    """Full-size SDXL (abstract, no memory): our UNet and bigG text encoder have exactly the parameter counts of
    diffusers' / transformers' models built on torch's meta device (2,567,463,684 and 694,659,840), with the
    built-in configs the single-file loader uses. On an fsdp=8 mesh of the virtual devices, the UNet + SAA params
    and both text encoders: every leaf carries logical axis names the rules table knows and gets a NamedSharding; every
    dim the rules send to fsdp is split except the UNet's 4-channel conv_out (8 does not divide 4); ≥ 99.9 % of
    the frozen base's bytes are split. (SAA's LoRA up-projections [r, C] are split over "tensor" only, so a pure
    FSDP mesh replicates them: docs/sdxl.md.)"""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dynamicid_jax.weights import keymap as km
    from dynamicid_jax.weights import single_file_sdxl as sfx

    configs = sfx.sdxl_configs()
    unet_cfg = U.UNetConfig.from_dict(configs["unet"])
    assert unet_cfg == U.unet_config("sdxl") and len(U.attention_layer_names(unet_cfg)) == 140
    assert C.CLIPTextConfig.from_dict(configs["text_encoder_2"]) == C.text_config("openclip-bigg")
    unet_with_saa = jax.eval_shape(  # one trace of the full UNet gives both the base and SAA's params
        lambda r: U.UNet2DConditionModel(unet_cfg, strategy=saa_lib.SAA()).init(r, *saa_lib._init_args(
            U.UNet2DConditionModel(unet_cfg), saa_lib.SAA()))["params"], jax.random.key(0))
    trees = {
        "unet": unet_with_saa,
        "text_encoder": jax.eval_shape(C.CLIPTextModel(C.text_config("sd15")).init, jax.random.key(0),
                                       jnp.zeros((1, 77), jnp.int32))["params"],
        "text_encoder_2": jax.eval_shape(C.CLIPTextModelWithProjection(C.text_config("openclip-bigg")).init,
                                         jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"],
    }
    with torch.device("meta"):
        theirs_unet = UNet2DConditionModel(**{k: v for k, v in configs["unet"].items() if k != "_class_name"})
        theirs_text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{
            k: v for k, v in configs["text_encoder_2"].items() if k not in ("architectures", "model_type")}))
    ours_unet = km.count_params(saa_lib.split_saa_params(nn.meta.unbox(unet_with_saa))[0])
    assert ours_unet == sum(p.numel() for p in theirs_unet.parameters()) == 2_567_463_684
    ours_text_2 = km.count_params(trees["text_encoder_2"])
    assert ours_text_2 == sum(p.numel() for p in theirs_text_2.parameters()) == 694_659_840

    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=8))
    rules = dict(sh.LOGICAL_AXIS_RULES)
    is_box = lambda x: hasattr(x, "names")  # noqa: E731
    not_split, base_total, base_split = [], 0, 0
    for name, tree in trees.items():
        boxed = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_box)
        shardings = jax.tree_util.tree_leaves(sh.logical_to_sharding(tree, mesh, allow_replicate_uneven=True),
                                              is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
        assert len(shardings) == len(boxed) > 0, name
        for (path, box), sharding in zip(boxed, shardings):
            key = name + jax.tree_util.keystr(path)
            assert is_box(box) and all(n is None or n in rules for n in box.names), key
            split = "fsdp" in jax.tree_util.tree_leaves(tuple(sharding.spec))
            wants_fsdp = any(n is not None and "fsdp" in jax.tree_util.tree_leaves((rules[n],)) for n in box.names)
            if wants_fsdp and not split:
                not_split.append(key)
            if not saa_lib.is_saa_path(tuple(getattr(k, "key", "") for k in path)):
                size = int(np.prod(box.value.shape)) * 4
                base_total += size
                base_split += size if split else 0
    assert sorted(not_split) == ["unet['conv_out']['bias']", "unet['conv_out']['kernel']"]
    assert base_split / base_total >= 0.999, base_split / base_total


def test_tokenizer_2_ids_follow_from_tokenizer_1():
    """SDXL's tokenizers differ only in padding for prompts without "!", so training data needs one tokenization
    (long prompts truncate, a literal EOS inside a prompt stays); with "!" (tokenizer 2's pad token, special
    everywhere) they differ, which is why stage 1 also reads input_ids_2."""
    from dynamicid_jax.pipelines.stable_diffusion_xl import tokenizer_2_ids
    from dynamicid_jax.tokenizer import SDXL_PAD_TOKEN, load_tokenizer, tokenize

    prompts = ["", "a photo of a person", "word " * 100, "<|endoftext|> in the text", "a, b. c? (d)"]
    tok, tok_2 = load_tokenizer(), load_tokenizer(pad_token=SDXL_PAD_TOKEN)
    np.testing.assert_array_equal(np.asarray(tokenizer_2_ids(tokenize(tok, prompts))), tokenize(tok_2, prompts))
    bang = "wow!"
    assert not np.array_equal(np.asarray(tokenizer_2_ids(tokenize(tok, bang))), tokenize(tok_2, bang))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_sdxl import make_tiny_sdxl

    folder, _ = make_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl_train")))
    return runs.load_base(folder, jnp.float32)


def stage1_batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"ref_clip_pixels": rng.standard_normal((b, 32, 32, 3)).astype(np.float32),
            "ref_id_embedding": rng.standard_normal((b, 16)).astype(np.float32),
            "input_ids": np.concatenate([np.full((b, 1), 49406), rng.integers(1, 1000, (b, 5)),
                                         np.full((b, 71), 49407)], axis=1).astype(np.int32),
            "identity": np.arange(b, dtype=np.int32),
            "target_latent_moments": rng.standard_normal((b, 8, 8, 8)).astype(np.float32)}


def test_stage1_on_sdxl_builds_and_traces(base):
    """load_base recognises SDXL; stage 1 freezes both text encoders, its SAA covers all 56 attention layers,
    and a traced step (eval_shape, no compile) gives a scalar loss with grads for exactly the trainable tree."""
    assert base.is_sdxl and base.unet_config.text_time
    cfg = load_config(None, TINY1 + [f"model.base={base.source}"], defaults=stage1.DEFAULTS)
    task = stage1.Stage1(cfg, base=base).task()
    assert set(task.frozen) == {"unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"}
    lora = {k[:-3] for k in traverse_util.flatten_dict(loop._unboxed(task.abstract_trainable["saa"]))
            if k[-3] == "to_q_lora"}
    assert len(lora) == len(U.attention_layer_names(base.unet_config)) == 56
    tx, sched = loop.make_optimizer({"lr": 1e-4})
    step = loop.make_train_step(task.loss_fn, tx, lr_schedule=sched)
    mesh = sh.make_mesh(sh.MeshConfig(data=1), devices=jax.devices()[:1])
    abstract_state, _ = loop.state_shardings(task, tx, mesh, False)
    new_state, metrics = jax.eval_shape(step, abstract_state, task.frozen, loop.numeric_batch(stage1_batch()))
    assert metrics["loss"].shape == ()
    assert jax.tree_util.tree_structure(new_state.trainable) == jax.tree_util.tree_structure(abstract_state.trainable)


@pytest.mark.slow  # the default run traces the same loss in tests/test_sdxl_methods.py
def test_infinite_id_stage_on_sdxl_traces(base):
    """Infinite-ID's trainer on the SDXL base: ID projections in every cross-attention, a traced step (the id-only
    loss with SDXL's added conditioning of an empty text) gives a scalar loss for exactly the trainable tree."""
    from train import infinite_id

    cfg = load_config(None, ["model.image_encoder=random:tiny", "model.encoder_variant=tiny-sdxl",
                             "model.dtype=float32", "train.progress_bar=false", f"model.base={base.source}"],
                      defaults=infinite_id.DEFAULTS)
    task = infinite_id.InfiniteIDStage(cfg, base=base).task()
    ids = {k[:-2] for k in traverse_util.flatten_dict(loop._unboxed(task.abstract_trainable["id_projections"]))
           if k[-2] == "to_k_id"}
    assert len(ids) == len(U.attention_layer_names(base.unet_config)) // 2
    tx, sched = loop.make_optimizer({"lr": 1e-4})
    step = loop.make_train_step(task.loss_fn, tx, lr_schedule=sched)
    mesh = sh.make_mesh(sh.MeshConfig(data=1), devices=jax.devices()[:1])
    abstract_state, _ = loop.state_shardings(task, tx, mesh, False)
    batch = {k: v for k, v in stage1_batch().items() if k != "input_ids"}
    _, metrics = jax.eval_shape(step, abstract_state, task.frozen, loop.numeric_batch(batch))
    assert metrics["loss"].shape == ()


@pytest.mark.slow
def test_stage1_and_stage2_train_on_sdxl(base, tmp_path):
    """Two stage-1 steps on a data=2 mesh of the tiny SDXL (with the sample grid): finite loss, LoRA ups and the
    ID encoder move; then two stage-2 steps on its export: the IMR moves."""
    cfg = load_config(None, TINY1 + [f"model.base={base.source}", "mesh.data=2", "train.steps=2",
                                     "train.sample_every=2", "sample.steps=2", "sample.size=64",
                                     'sample.prompts=["a", "b"]'], defaults=stage1.DEFAULTS)
    s1 = stage1.Stage1(cfg, base=base)
    mesh = sh.make_mesh(sh.MeshConfig(data=2), devices=jax.devices()[:2])
    tr = loop.Trainer(s1.task(references=stage1_batch(1)), cfg, str(tmp_path / "s1"), mesh=mesh)
    state0 = jax.device_get(tr.init_state())
    state = tr.fit(iter([stage1_batch(4, 1), stage1_batch(4, 2)]))
    after = jax.device_get(state.trainable)
    ups = [k for k in traverse_util.flatten_dict(after["saa"]) if k[-2] == "up"]
    assert ups and all(np.abs(traverse_util.flatten_dict(after["saa"])[k]).max() > 0 for k in ups)
    assert not np.allclose(after["id_encoder"]["proj_0"]["kernel"], state0.trainable["id_encoder"]["proj_0"]["kernel"])
    assert (tmp_path / "s1" / "samples").is_dir()

    cfg2 = load_config(None, TINY2 + [f"model.base={base.source}", "mesh.data=2", "train.steps=2"],
                       defaults=stage2.DEFAULTS)
    s2 = stage2.Stage2(cfg2, base=base, stage1_params=after)
    tr2 = loop.Trainer(s2.task(), cfg2, str(tmp_path / "s2"), mesh=mesh)
    before = jax.device_get(tr2.init_state())
    rng = np.random.default_rng(3)
    raster = lambda *s: np.where(rng.uniform(size=s) < 0.02, 1.0, -1.0).astype(np.float32)  # noqa: E731
    ids = lambda *s: np.concatenate([np.full(s + (1,), 49406), rng.integers(1, 1000, s + (4,)),  # noqa: E731
                                     np.full(s + (72,), 49407)], axis=-1).astype(np.int32)
    batch = lambda: {"src_raster": raster(1, 96, 96, 1), "tgt_rasters": raster(1, 2, 96, 96, 1),  # noqa: E731
                     "src_face_prompt_ids": ids(1), "tgt_face_prompt_ids": ids(1, 2),
                     "tgt_latent_moments": rng.standard_normal((1, 2, 8, 8, 8)).astype(np.float32),
                     "src_index": np.zeros(1, np.int32), "tgt_index": np.zeros((1, 2), np.int32),
                     "identity": np.zeros(1, np.int32),
                     "src_tokens": rng.standard_normal((1, 4, 64)).astype(np.float32),
                     "tgt_tokens": rng.standard_normal((1, 2, 4, 64)).astype(np.float32)}
    state2 = jax.device_get(tr2.fit(iter([batch(), batch()])))
    assert not np.allclose(state2.trainable["imr"]["proj_out"]["kernel"],
                           before.trainable["imr"]["proj_out"]["kernel"])
