"""Stage-1 train step with the real SD1.5 architecture (random weights): ours vs a PyTorch reference, same run.

    python benchmarks/train_step.py                      # accelerator: 512², batch 8; CPU: 128², batch 1
    python benchmarks/train_step.py --size 256 --batch 4 --remat dots --dtype bfloat16 --save

Ours: :class:`train.stage1.Stage1` through :class:`train.loop.Trainer` (the jitted, sharded, donated step;
batch split over every local device), with precomputed latent moments and CLIP-H features (the training
data's format), so the step is ID encoder + SAA UNet forward and backward + AdamW. Reported: step time,
images/s and MFU = model FLOPs / (step time × peak), with model FLOPs from :func:`unet_forward_flops`
(analytic: convolutions, projections, attention matmuls, feed-forward) × 2 — the base weights are frozen, so
the backward pass computes activation gradients only (the LoRA / ID-encoder weight gradients are < 2 % and not
counted); remat recomputation is not counted either (the MFU convention).

PyTorch reference (when torch and diffusers are installed): diffusers ``UNet2DConditionModel`` with the same
LoRA + gated ID branch as attention processors (``tests/torch_reference_saa.py``) and the official ID encoder
(``tests/torch_reference.py``), AdamW on exactly those params; ``torch.autocast`` fp16 on CUDA, and on CPU only
with ``--torch-autocast on`` (bf16; several times slower than fp32 on CPUs without native bf16 matmuls — on the
2-core dev VM, 128², batch 1: 97 s per step vs 53 s in fp32). ``ratio`` = our step time / PyTorch's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# bf16 dense peaks (TFLOP/s) by device_kind prefix, for MFU
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v4": 275.0, "TPU v6": 918.0}


def unet_forward_flops(config, height: int, width: int, context_len: int = 81) -> float:
    """Analytic FLOPs (2 per multiply-add) of one UNet forward for one ``height × width`` latent.

    Counts convolutions, attention projections (incl. proj_in/out), QKᵀ and AV, GEGLU feed-forward and the
    time-embedding projections of the ResNets; norms and elementwise ops are ignored. ``context_len`` = text
    tokens + ID tokens of the cross-attention (77 + 4)."""
    ch = config.block_out_channels
    cross = config.cross_attention_dim
    temb = 4 * ch[0]
    total = 0.0

    def conv(h, w, k, cin, cout):
        return 2.0 * h * w * k * k * cin * cout

    def resnet(h, w, cin, cout):
        f = conv(h, w, 3, cin, cout) + conv(h, w, 3, cout, cout) + 2.0 * temb * cout
        return f + (conv(h, w, 1, cin, cout) if cin != cout else 0.0)

    def transformer(h, w, c, layers):
        tokens = h * w
        f = 2 * 2.0 * tokens * c * c  # proj_in, proj_out
        for _ in range(layers):
            f += 4 * 2.0 * tokens * c * c + 2 * 2.0 * tokens * tokens * c  # attn1: q k v out, QKᵀ, AV
            f += 2 * 2.0 * tokens * c * c + 2 * 2.0 * context_len * cross * c  # attn2: q out, k v
            f += 2 * 2.0 * tokens * context_len * c
            f += 2.0 * tokens * c * 8 * c + 2.0 * tokens * 4 * c * c  # GEGLU (c → 2·4c) and 4c → c
        return f

    h, w = height, width
    total += conv(h, w, 3, config.in_channels, ch[0])
    skips = [ch[0]]
    cin = ch[0]
    for i, kind in enumerate(config.down_block_types):
        for _ in range(config.layers_per_block):
            total += resnet(h, w, cin, ch[i])
            cin = ch[i]
            if kind == "CrossAttnDownBlock2D":
                total += transformer(h, w, ch[i], config.transformer_layers[i])
            skips.append(cin)
        if i < len(ch) - 1:
            h, w = h // 2, w // 2
            total += conv(h, w, 3, cin, cin)
            skips.append(cin)
    total += 2 * resnet(h, w, cin, cin) + transformer(h, w, cin, config.transformer_layers[-1])
    rev = list(reversed(ch))
    rev_layers = list(reversed(config.transformer_layers))
    for i, kind in enumerate(config.up_block_types):
        for _ in range(config.layers_per_block + 1):
            total += resnet(h, w, cin + skips.pop(), rev[i])
            cin = rev[i]
            if kind == "CrossAttnUpBlock2D":
                total += transformer(h, w, cin, rev_layers[i])
        if i < len(ch) - 1:
            h, w = 2 * h, 2 * w
            total += conv(h, w, 3, cin, cin)
    total += conv(h, w, 3, ch[0], config.out_channels)
    return total


def _peak(kind: str) -> float | None:
    for prefix, tflops in PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return tflops * 1e12
    return None


def random_stage1(dtype_name: str, remat, lora_rank: int):
    """Stage1 on random SD1.5-architecture weights (UNet, VAE, text encoder) and a random ID encoder."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamicid_jax.models import clip, unet, vae
    from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler
    from dynamicid_jax.tokenizer import load_tokenizer
    from train import runs, stage1
    from train.config import load_config

    dtype = runs.compute_dtype(dtype_name)
    u_cfg = unet.unet_config("sd15")
    v = vae.AutoencoderKL(vae.vae_config("sd15"), dtype=dtype)
    text = clip.CLIPTextModel(clip.text_config("sd15"), dtype=dtype)
    params = {"unet": unet.init_params(unet.UNet2DConditionModel(u_cfg), jax.random.key(0)),
              "vae": vae.init_params(v, jax.random.key(1)),
              "text_encoder": jax.tree_util.tree_map(
                  lambda x: x.unbox() if hasattr(x, "unbox") else x,
                  jax.jit(text.init)(jax.random.key(2), jnp.zeros((1, 77), jnp.int32))["params"],
                  is_leaf=lambda x: hasattr(x, "unbox"))}
    base = runs.BaseModel(unet_config=u_cfg, vae=v, text_encoder=text, tokenizer=load_tokenizer(),
                            scheduler=load_scheduler(dict(SD15_SCHEDULER_CONFIG), kind="ddim"), params=params,
                            scaling_factor=float(v.config.scaling_factor), source="random:sd15")
    cfg = load_config(None, [f"model.dtype={dtype_name}", f"model.remat={remat}", f"model.lora_rank={lora_rank}",
                             "train.progress_bar=false", "checkpoint.every=0"], defaults=stage1.DEFAULTS)
    stage = stage1.Stage1(cfg, base=base, image_encoder=(None, None, ""))
    stage.uncond_clip = np.zeros((1, 257, 1280), np.float32)  # stands in for CLIP(grey) with random weights
    return stage, cfg


def batch_for(b: int, size: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"target_latent_moments": rng.standard_normal((b, size // 8, size // 8, 8)).astype(np.float32),
            "ref_clip_features": rng.standard_normal((b, 257, 1280)).astype(np.float32),
            "ref_id_embedding": rng.standard_normal((b, 512)).astype(np.float32),
            "input_ids": rng.integers(1, 49407, (b, 77)).astype(np.int32)}


def bench_jax(args) -> dict:
    import jax

    from train import loop

    start = time.perf_counter()
    stage, cfg = random_stage1(args.dtype, args.remat, args.lora_rank)
    trainer = loop.Trainer(stage.task(), cfg, args.workdir)
    state = trainer.init_state()
    print(f"ours: random weights and train state in {time.perf_counter() - start:.1f}s", flush=True)
    batches = [batch_for(args.batch, args.size, i) for i in range(2)]
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    print(f"ours: first step (compile included) {compile_s:.1f}s", flush=True)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    times.sort()
    step = times[len(times) // 2]
    return {"step_s": step, "first_step_incl_compile_s": compile_s, "images_per_s": args.batch / step,
            "loss": float(loop.host_value(metrics["loss"]))}


def bench_torch(args) -> dict | None:
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from torch_reference import ProjPlusModel
    from torch_reference_saa import saa_processors

    from dynamicid_jax.models.unet import unet_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.float16 if device == "cuda" else torch.bfloat16
    use_amp = args.torch_autocast == "on" or (args.torch_autocast == "auto" and device == "cuda")
    torch.manual_seed(0)
    cfg = {k: v for k, v in unet_config("sd15").to_dict().items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**cfg).to(device)
    unet.requires_grad_(False)
    procs = saa_processors(unet, args.lora_rank)
    unet.set_attn_processor(procs)
    encoder = ProjPlusModel().to(device)
    trainable = [p for proc in procs.values() for p in proc.parameters()] + list(encoder.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    b, h = args.batch, args.size // 8
    latents = torch.randn(b, 4, h, h, device=device)
    text = torch.randn(b, 77, 768, device=device)
    embeds, feats = torch.randn(b, 512, device=device), torch.randn(b, 257, 1280, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp, enabled=use_amp):
            tokens = encoder(embeds, feats)
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (b,), device=device)
            pred = unet(latents + noise, t, torch.cat([text, tokens.to(text.dtype)], 1)).sample
            loss = torch.mean((pred.float() - noise) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"step_s": times[len(times) // 2], "images_per_s": b / times[len(times) // 2], "device": device,
            "autocast": str(amp).replace("torch.", "") if use_amp else "off (fp32)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="image px (default 512 on accelerators, 128 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 8 on accelerators, 1 on CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; float32 on CPU)")
    p.add_argument("--remat", default="none")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-autocast", choices=("auto", "on", "off"), default="auto",
                   help="auto: on for CUDA (fp16), off on CPU (CPU bf16 autocast is far slower than fp32 there)")
    p.add_argument("--workdir", default="/tmp/dynamicid_train_step_bench")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/train_step_<device>.json")
    args = p.parse_args()

    import jax

    from harness import machine, write_result
    from dynamicid_jax.models.unet import unet_config

    on_cpu = jax.default_backend() == "cpu"
    args.size = args.size or (128 if on_cpu else 512)
    args.batch = args.batch or (1 if on_cpu else 8)
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    ours = bench_jax(args)
    print(f"ours: {ours['step_s'] * 1e3:.1f} ms/step, {ours['images_per_s']:.1f} images/s", flush=True)
    fwd = unet_forward_flops(unet_config("sd15"), args.size // 8, args.size // 8)
    step_flops = 2 * fwd * args.batch
    kind = jax.devices()[0].device_kind
    peak = _peak(kind)
    ours["tflops_per_s"] = step_flops / ours["step_s"] / 1e12
    ours["mfu"] = None if peak is None else step_flops / ours["step_s"] / (peak * jax.device_count())
    ref = None if args.no_torch else bench_torch(args)
    result = {"benchmark": "stage1_train_step", "machine": machine(), "device_kind": kind,
              "devices": jax.device_count(), "size": args.size, "batch": args.batch, "dtype": args.dtype,
              "remat": args.remat, "lora_rank": args.lora_rank, "unet_forward_gflops_per_image": fwd / 1e9,
              "model_gflops_per_step": step_flops / 1e9, "ours": ours, "torch": ref,
              "ratio_ours_over_torch": None if ref is None else ours["step_s"] / ref["step_s"]}
    import json

    print(json.dumps(result, indent=2))
    if args.save:
        name = f"train_step_{kind.replace(' ', '_').lower()}_{args.size}"
        print("wrote", write_result(result, name))


if __name__ == "__main__":
    main()
