"""Assemble the DynamicID pipeline folder from the stage exports.

    python -m train.export_dynamicid --stage1 W1/export/stage1.safetensors --stage2 W2/export/stage2.safetensors \
        --out DIR [--image-encoder FOLDER | random:<variant> | none]

Writes ``DIR`` in the format :func:`dynamicid_jax.pipelines.dynamicid.load_dynamicid` reads (``dynamicid.json``,
``id_encoder``, ``saa``, and with a stage-2 export ``imr`` + ``keypoint_encoder``; see that module) plus
``DIR/image_encoder/``, the CLIP vision tower stage 1 trained with (a transformers
``CLIPVisionModelWithProjection`` folder), so that ``DynamicIDPipeline.from_pretrained(base, DIR, ...)`` needs
nothing else. The configs come from the exports' metadata (written by ``train.stage1`` / ``train.stage2``). The
folder appears complete or not at all; an existing ``DIR`` is replaced.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

log = logging.getLogger(__name__)

__all__ = ["export_dynamicid", "main"]


def _metadata(path: str, stage: str, fmt: str) -> dict[str, str]:
    """The metadata of ``stage``'s export (``"stage1"`` / ``"stage2"``), with clear errors."""
    from train.runs import export_metadata

    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"the {stage} export {path!r} does not exist (python -m train.{stage} ... "
                                f"workdir=W writes W/export/{stage}.safetensors)")
    meta = export_metadata(path)
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a {stage} export of this version (format {meta.get('format')!r}, expected "
                         f"{fmt!r}); train or export it again with python -m train.{stage}")
    return meta


def _image_encoder_into(spec: str, folder: str) -> None:
    """Put the CLIP vision tower ``spec`` (a folder or ``random:<variant>``) at ``folder``."""
    from dynamicid_jax.models.clip import save_image_encoder
    from train import runs

    if spec.startswith("random:"):
        import jax.numpy as jnp

        module, params, _ = runs.load_image_encoder(spec, jnp.float32)
        save_image_encoder(folder, module, params)
    elif os.path.isdir(spec):
        shutil.copytree(spec, folder)
    else:
        raise FileNotFoundError(f"image encoder {spec!r} is neither a CLIP vision folder nor random:<variant>")


def export_dynamicid(stage1: str, stage2: str | None, out: str, *, image_encoder: str | None = None) -> str:
    """Write the DynamicID folder ``out`` from a stage-1 export and (optionally) a stage-2 export; returns ``out``.

    ``image_encoder``: the CLIP vision folder (or ``random:<variant>``) to include as ``out/image_encoder``;
    default: the one the stage-1 export names; ``"none"``: leave it out (pass ``clip_vision_path`` when loading).
    """
    from dynamicid_jax.methods import id_encoder as ide
    from dynamicid_jax.methods import imr as imr_lib
    from dynamicid_jax.methods import saa as saa_lib
    from dynamicid_jax.models.unet import UNetConfig
    from dynamicid_jax.pipelines.dynamicid import DynamicIDWeights, save_dynamicid
    from train import runs
    from train.stage1 import EXPORT_FORMAT as STAGE1_FORMAT
    from train.stage2 import EXPORT_FORMAT as STAGE2_FORMAT

    meta1 = _metadata(stage1, "stage1", STAGE1_FORMAT)
    params1 = runs.load_params(stage1)
    weights = DynamicIDWeights(
        id_encoder_config=ide.IDEncoderConfig.from_dict(json.loads(meta1["id_encoder_config"])),
        id_encoder_params=params1["id_encoder"], saa=saa_lib.SAA(**json.loads(meta1["saa"])),
        saa_unet_config=UNetConfig.from_dict(json.loads(meta1["unet_config"]), source=f"{stage1} metadata"),
        saa_params=params1["saa"])
    if stage2:
        meta2 = _metadata(stage2, "stage2", STAGE2_FORMAT)
        if meta2.get("stage1") and os.path.abspath(stage1) != meta2["stage1"]:
            log.warning("%s was trained on the stage-1 export %s, not on %s", stage2, meta2["stage1"], stage1)
        params2 = runs.load_params(stage2)
        weights.imr_config = imr_lib.IMRConfig.from_dict(json.loads(meta2["imr_config"]))
        weights.imr_params = params2["imr"]
        weights.keypoint_encoder_config = imr_lib.KeyPointEncoderConfig.from_dict(
            json.loads(meta2["keypoint_encoder_config"]))
        weights.keypoint_encoder_variables = {"params": params2["keypoint_encoder"],
                                              "batch_stats": params2["batch_stats"]}
    spec = meta1.get("image_encoder", "") if image_encoder is None else image_encoder
    if not spec:
        raise ValueError(f"{stage1} names no image encoder (it was trained on precomputed CLIP features): give "
                         f"image_encoder= a CLIP vision folder, or 'none'")
    from dynamicid_jax.file_io import atomic_folder
    from dynamicid_jax.pipelines.dynamicid import check_overwritable

    out = os.path.abspath(out)
    check_overwritable(out, overwrite=True)  # replace only a DynamicID folder we wrote, never a user's folder
    with atomic_folder(out, replace=True) as tmp:
        folder = save_dynamicid(os.path.join(tmp, "dynamicid"), weights)
        if spec != "none":
            _image_encoder_into(spec, os.path.join(folder, "image_encoder"))
        for name in os.listdir(folder):
            os.replace(os.path.join(folder, name), os.path.join(tmp, name))
        os.rmdir(folder)
    log.info("wrote the DynamicID folder %s (IMR: %s)", out, "yes" if stage2 else "no")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage1", required=True, help="stage-1 export (W1/export/stage1.safetensors)")
    p.add_argument("--stage2", default=None, help="stage-2 export (W2/export/stage2.safetensors); without it the "
                                                  "folder has no IMR (no face prompts)")
    p.add_argument("--image-encoder", default=None, help="CLIP vision folder or random:<variant> to include as "
                                                         "DIR/image_encoder (default: the stage-1 export's); none: "
                                                         "leave it out")
    p.add_argument("--out", required=True, help="the DynamicID folder to write (replaced if it exists)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    export_dynamicid(args.stage1, args.stage2, args.out, image_encoder=args.image_encoder)
    return 0


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
