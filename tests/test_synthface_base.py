"""The shipped SynthFace base (assets/synthface_base, written by ``make base`` = ``python -m synthface.demo_base``,
formerly ``python -m infer.demo_base``): every file matches its provenance, the provenance describes the world this
checkout renders, our loader and diffusers / transformers read the same fp16 weights and compute the same thing, the
SD1.5 tokenizer still works with the zeroed embedding rows, the base draws what SynthFace captions ask for, and its
text encoder tells the expression words apart."""
import json
import os
import shutil

import numpy as np
import pytest

from synthface import demo_base

ASSET = demo_base.ASSET_DIR


@pytest.fixture(scope="module")
def provenance():
    return demo_base.verify_base(ASSET)


@pytest.fixture(scope="module")
def sd():
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(ASSET)


def test_files_match_provenance(provenance):
    assert provenance["format"] == demo_base.PROVENANCE_FORMAT
    assert len(provenance["commit"]) == 40 and int(provenance["commit"], 16) >= 0
    assert provenance["command"].startswith(demo_base.BASE_COMMANDS)  # the shipped one: python -m infer.demo_base
    assert provenance["weights_dtype"] == "float16"
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "model_index.json", "tokenizer/tokenizer_config.json"):
        assert rel in provenance["files"], rel
    d = provenance["diffusion"]
    assert d["steps"] >= 1000 and d["loss_tail_mean"] < d["loss_first"]
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ASSET) for f in fs)
    assert size < 20 * 2 ** 20, f"the asset is {size / 2 ** 20:.1f} MB on disk"


def test_tampering_is_detected(tmp_path):
    copy = str(tmp_path / "base")
    shutil.copytree(ASSET, copy)
    demo_base.verify_base(copy)
    path = os.path.join(copy, "unet", "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["norm_eps"] = 1e-3
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    with pytest.raises(demo_base.BaseAssetError, match="unet/config.json differs"):
        demo_base.verify_base(copy)
    shutil.copyfile(os.path.join(ASSET, "unet", "config.json"), path)
    with open(os.path.join(copy, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(demo_base.BaseAssetError, match="notes.txt"):
        demo_base.verify_base(copy)
    os.remove(os.path.join(copy, "notes.txt"))
    os.remove(os.path.join(copy, "vae", "config.json"))
    with pytest.raises(demo_base.BaseAssetError, match="vae/config.json is missing"):
        demo_base.verify_base(copy)


def test_provenance_describes_this_world(provenance):
    """The fingerprint of the world this checkout would render (schema, seed, size, identity lists, renderer
    constants) is the one the base was trained on — a change to the world without ``make base`` fails here."""
    from synthface import SCHEMA
    from synthface.world import identity_name

    w = provenance["world"]["settings"]
    assert w == demo_base.WORLD
    index = {"schema": SCHEMA, "seed": w["seed"], "image_size": w["size"],
             "splits": {"train": [identity_name("train", i) for i in range(w["identities"])],
                        "heldout": [identity_name("heldout", i) for i in range(w["heldout"])]}}
    assert demo_base.world_fingerprint(index) == provenance["world"]["fingerprint"]
    assert provenance["world"]["train_images"] == w["identities"] * 35
    assert provenance["world"]["train_pairs"] == w["pairs"]


def test_demo_world_may_add_training_identities(provenance):
    """A demo world with the base's training identities followed by more passes the base check (and reports how
    many it adds); one with fewer, with other identities first, or with other held-out identities fails."""
    from synthface import SCHEMA
    from synthface.world import identity_name

    w = provenance["world"]["settings"]

    def index(train, heldout=w["heldout"], first=0):
        return {"schema": SCHEMA, "seed": w["seed"], "image_size": w["size"],
                "splits": {"train": [identity_name("train", i) for i in range(first, first + train)],
                           "heldout": [identity_name("heldout", i) for i in range(heldout)],
                           "validation": [identity_name("validation", i) for i in range(3)]}}

    assert demo_base.base_world_match(provenance, index(w["identities"]))["extra_train_identities"] == 0
    match = demo_base.base_world_match(provenance, index(w["identities"] + 40))
    assert match == {"world_fingerprint": provenance["world"]["fingerprint"], "extra_train_identities": 40}
    for bad in (index(w["identities"] - 1), index(w["identities"] + 5, first=5), index(w["identities"], w["heldout"] + 1)):
        with pytest.raises(demo_base.BaseAssetError, match="not the one the shipped base was trained on"):
            demo_base.base_world_match(provenance, bad)


def test_fp16_on_disk_fp32_in_memory(sd):
    from safetensors import safe_open

    with safe_open(os.path.join(ASSET, "unet", "diffusion_pytorch_model.safetensors"), "np") as f:
        dtypes = {f.get_tensor(k).dtype for k in list(f.keys())[:20]}
    assert dtypes == {np.dtype(np.float16)}
    import jax

    assert {x.dtype for x in jax.tree_util.tree_leaves(sd.params["unet"])} == {np.dtype(np.float32)}


def test_tokenizer_and_zeroed_rows(sd, provenance):
    """World texts tokenize onto trained (non-zero) embedding rows; a word the world never uses maps to a zero
    row; the count of non-zero rows is the provenance's."""
    from dynamicid_jax.tokenizer import tokenize

    table = np.asarray(sd.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    nonzero = np.flatnonzero(np.abs(table).sum(1) > 0)
    assert len(nonzero) == provenance["text_vocabulary"]["kept_rows"] < 200
    world = tokenize(sd.tokenizer, ["a photo of two people side by side, the person on the left wears a red shirt, "
                                    "the person on the right wears a yellow shirt, blue background",
                                    "in a happy expression, in side view"])
    assert np.all(np.isin(np.asarray(world), nonzero))
    outside = np.asarray(tokenize(sd.tokenizer, ["astronaut"]))[0, 1]
    assert outside not in nonzero and not np.any(table[outside])


def test_diffusers_reads_the_same_weights(sd, torch):
    """diffusers' UNet and transformers' CLIP text model load the folder and agree with ours on one input."""
    import jax.numpy as jnp
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    ids = np.asarray(__import__("dynamicid_jax.tokenizer", fromlist=["tokenize"]).tokenize(
        sd.tokenizer, ["a photo of a person in a red shirt in the center, blue background"]))
    ours_text = np.asarray(sd.text_encoder.apply({"params": sd.params["text_encoder"]}, jnp.asarray(ids))
                           .last_hidden_state)
    text = CLIPTextModel.from_pretrained(os.path.join(ASSET, "text_encoder"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs_text = text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(ours_text, theirs_text, rtol=1e-4, atol=1e-4)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ASSET, "unet"), torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    size = sd.unet.config.sample_size  # the base's own latent grid (32 × 32 for 64² images)
    latents = rng.standard_normal((1, size, size, sd.unet.config.in_channels)).astype(np.float32)
    ours = np.asarray(sd.unet.apply({"params": sd.params["unet"]}, jnp.asarray(latents), jnp.asarray([500]),
                                    jnp.asarray(ours_text)))
    with torch.no_grad():
        theirs = unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.tensor([500]),
                      encoder_hidden_states=torch.from_numpy(np.array(ours_text))).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_the_base_draws_the_captions_background(sd):
    """Eight captions, each with another background colour: the generated images' corners show it (the stage-0
    palette check; a base that ignores its prompt scores about 1/10)."""
    from synthface.stage0_checks import background_palette_accuracy, sample_prompts

    prompts, labels = sample_prompts(8)
    images = sd.generate(prompts, height=64, width=64, steps=12, guidance_scale=4.0, seed=0)
    assert images.shape == (8, 64, 64, 3)
    assert background_palette_accuracy(images, [lab["background"] for lab in labels]) >= 0.75


def test_the_text_encoder_tells_the_expressions_apart(sd):
    """The base trains with stage 0's auxiliary text loss (train/configs/synthface_base.yaml, ``text_aux_weight``):
    the pooled text embeddings of the seven face prompts (one per expression: the IMR's text input) lie at least half
    their norm apart on average; the base trained without that loss gave them 0.085, nearly one vector."""
    from synthface.demo_diagnostics import expression_face_prompts, pooled_text_spread

    prompts = expression_face_prompts()
    assert len(set(prompts)) == 7
    assert pooled_text_spread(sd, prompts) >= 0.5
