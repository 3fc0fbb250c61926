"""Convert the official DynamicID checkpoints into a dynamicid-jax folder (safetensors + JSON), once.

    python -m infer.convert --saa SAA.bin [--imr IMR.bin] [--key-point-encoder key_point_encoder.bin] \\
        --unet-config sd15|PATH --out DIR

The ``.bin`` files are read without running pickled code. ``SAA.bin`` gives the ID encoder (``proj_module``)
and the SAA attention weights (``SAA_module``, one entry per UNet attention layer — which is why the UNet's
architecture is needed: ``sd15`` for the built-in SD1.5 config, or a diffusers model folder / its ``unet/``
folder / a ``config.json``). ``IMR.bin`` (face-prompt editing) needs ``key_point_encoder.bin``, looked up beside it
under the official name when not given. The output folder (layout: :mod:`dynamicid_jax.pipelines.dynamicid`)
appears complete or not at all; ``python -m infer.generate --dynamicid DIR`` and
``DynamicIDPipeline.from_pretrained(sd, DIR)`` load it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def resolve_unet_config(value: str):
    """``"sd15"`` → the built-in SD1.5 UNet config; a diffusers pipeline folder, a ``unet/`` folder or a
    ``config.json`` file → that config."""
    from dynamicid_jax.models.unet import UNetConfig, unet_config
    from dynamicid_jax.weights import keymap as km

    if value == "sd15":
        return unet_config("sd15")
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise ValueError(f"--unet-config: expected 'sd15', a folder or a config.json file, got the file {value!r}")
        folder, name = os.path.split(os.path.abspath(path))
        return UNetConfig.from_dict(km.read_config(folder, name), source=path)
    folder = km.find_component(path, "unet", what="UNet config")
    return UNetConfig.from_dict(km.read_config(folder), source=os.path.join(folder, "config.json"))


def convert(saa: str, out: str, unet_config, *, imr: str | None = None, key_point_encoder: str | None = None,
            overwrite: bool = False, backend: str = "auto") -> tuple[str, dict]:
    """Import the official files and write the converted folder; returns ``(out, {part: parameter count})``."""
    from dynamicid_jax.methods.saa import SAA
    from dynamicid_jax.pipelines.dynamicid import DynamicIDWeights, save_dynamicid
    from dynamicid_jax.methods import dynamicid_official as official
    from dynamicid_jax.weights.keymap import count_params
    from dynamicid_jax.weights.torch_pickle import safe_torch_load

    from dynamicid_jax.file_io import check_writable
    from dynamicid_jax.pipelines.dynamicid import check_overwritable

    check_overwritable(os.path.abspath(out), overwrite)  # --overwrite replaces only a folder we wrote
    check_writable(out, "--out", folder=True)
    if key_point_encoder is not None and imr is None:
        raise ValueError("--key-point-encoder belongs to the IMR: give --imr as well")
    if imr is not None and key_point_encoder is None:
        key_point_encoder = official.keypoint_encoder_path_for(imr)
        if not os.path.isfile(key_point_encoder):
            raise FileNotFoundError(f"the IMR needs its KeyPointEncoder: {key_point_encoder} (beside {imr}) does not "
                                    f"exist; pass --key-point-encoder")
    parts = official.read_saa_bin(saa, backend=backend)
    enc_config, enc_params = official.import_id_encoder(parts["proj_module"], source=f"{saa}['proj_module']")
    strategy = SAA(lora_rank=official.infer_saa_rank(parts["SAA_module"]))
    saa_params = official.import_saa(parts["SAA_module"], unet_config, strategy=strategy,
                                     source=f"{saa}['SAA_module']")
    weights = DynamicIDWeights(enc_config, enc_params, strategy, unet_config, saa_params)
    if imr is not None:
        weights.imr_config, weights.imr_params = official.import_imr(safe_torch_load(imr, backend=backend), source=imr)
        weights.keypoint_encoder_config, weights.keypoint_encoder_variables = official.import_keypoint_encoder(
            safe_torch_load(key_point_encoder, backend=backend), source=key_point_encoder)
    counts = {"id_encoder": count_params(enc_params), "saa": count_params(saa_params)}
    if imr is not None:
        counts["imr"] = count_params(weights.imr_params)
        counts["keypoint_encoder"] = count_params(weights.keypoint_encoder_variables["params"])
    return save_dynamicid(out, weights, overwrite=overwrite), counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.convert", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saa", required=True, metavar="SAA.bin", help="official SAA.bin (proj_module + SAA_module)")
    p.add_argument("--imr", metavar="IMR.bin", help="official IMR.bin (optional: face-prompt editing)")
    p.add_argument("--key-point-encoder", metavar="key_point_encoder.bin",
                   help="default: key_point_encoder.bin beside IMR.bin")
    p.add_argument("--unet-config", required=True, metavar="sd15|PATH",
                   help="the UNet the SAA weights belong to: 'sd15', a diffusers folder, unet/ or config.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a converted DynamicID folder (one this tool wrote); anything else is "
                        "refused, never deleted")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "restricted"],
                   help="checkpoint reader: torch.load(weights_only=True) or our restricted unpickler (no torch)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out, counts = convert(args.saa, args.out, resolve_unet_config(args.unet_config), imr=args.imr,
                          key_point_encoder=args.key_point_encoder, overwrite=args.overwrite, backend=args.backend)
    summary = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
    print(f"converted in {time.perf_counter() - start:.1f}s: {summary}", file=sys.stderr)
    print(os.path.abspath(out))
    return 0


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
