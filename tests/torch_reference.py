"""An independent PyTorch expression of DynamicID's ID encoder, KeyPointEncoder and IMR — the tests' oracle.

Written from docs/method.md §3 / §5; only the module attribute names follow the official checkpoints, so that
``state_dict()`` produces exactly the official keys:

* ``ProjPlusModel`` / ``FacePerceiverResampler`` / ``PerceiverAttention`` / ``FeedForward`` key names: the
  official ``functions.py`` (``SAA.bin["proj_module"]``);
* ``KeyPointEncoder`` (``blocks.i.j.conv_block.{0,1}``) and ``IMR`` (``feature_fusion``, ``norm_in``,
  ``proj_in``, ``disentangleNet``, ``entangleNet``, ``norm_out``, ``proj_out``; blocks of PerceiverAttention,
  ``MultAttention``, FeedForward): the official ``model.py`` (``key_point_encoder.bin``, ``IMR.bin``).

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` on 4-D heads (the intended computation; the
official ``model.py`` helper has a 3-D/4-D mix-up that cannot run).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``q [B, Lq, H·D]``, ``k, v [B, Lk, H·D]`` → ``[B, Lq, H·D]``; softmax(q kᵀ / √D) v per head."""
    b, lq, width = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, width // heads).permute(0, 2, 1, 3)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.permute(0, 2, 1, 3).reshape(b, lq, width)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Indices 0 (LN), 1 (Linear up), 2 (GELU), 3 (Linear down) — the official Sequential layout."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Queries from LN₂(latents); keys/values from [LN₁(context); LN₂(latents)] through one packed Linear."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        c, lat = self.norm1(context), self.norm2(latents)
        kv = self.to_kv(torch.cat([c, lat], dim=1))
        inner = kv.shape[-1] // 2
        return self.to_out(_heads_attention(self.to_q(lat), kv[..., :inner], kv[..., inner:], self.heads))


class MultAttention(nn.Module):
    """Self-attention on LN(x) with a packed to_kv (the official IMR's second block element)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        k, v = self.to_kv(h).chunk(2, dim=-1)
        return self.to_out(_heads_attention(self.to_q(h), k, v, self.heads))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, clip_dim: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(clip_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, latents: torch.Tensor, clip_features: torch.Tensor) -> torch.Tensor:
        context = self.proj_in(clip_features)
        for attention, ff in self.layers:
            latents = latents + attention(context, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    """ArcFace vector + CLIP tokens → ``num_tokens`` ID tokens (docs/method.md §3)."""

    def __init__(self, id_embed_dim: int = 512, num_tokens: int = 4, dim: int = 768, clip_dim: int = 1280,
                 depth: int = 4, heads: int = 12, head_dim: int = 64, ff_mult: int = 4):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.proj = nn.Sequential(nn.Linear(id_embed_dim, 2 * id_embed_dim), nn.GELU(),
                                  nn.Linear(2 * id_embed_dim, num_tokens * dim))
        self.norm = nn.LayerNorm(dim)
        self.perceiver_resampler = FacePerceiverResampler(dim, depth, heads, head_dim, clip_dim, ff_mult)

    def mlp_tokens(self, id_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(id_embeds).reshape(id_embeds.shape[0], self.num_tokens, self.dim))

    def forward(self, id_embeds, clip_features, shortcut: bool = False, scale: float = 1.0):
        x = self.mlp_tokens(id_embeds)
        out = self.perceiver_resampler(x, clip_features)
        return x + scale * out if shortcut else out


class ConvUnit(nn.Module):
    """Conv (bias) → BatchNorm → (+ input if residual) → ReLU; attribute ``conv_block`` = Sequential(conv, bn)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x):
        y = self.conv_block(x)
        return F.relu(y + x if self.residual else y)


class KeyPointEncoder(nn.Module):
    """1×96×96 landmark raster (NCHW) → [B, embedding_dim, 1, 1] (docs/method.md §5)."""

    def __init__(self, embedding_dim: int = 768):
        super().__init__()

        def stage(cin, cout, n_res):
            return [ConvUnit(cin, cout, 3, 2, 1)] + [ConvUnit(cout, cout, 3, 1, 1, residual=True)
                                                    for _ in range(n_res)]

        self.blocks = nn.ModuleList([
            nn.Sequential(ConvUnit(1, 16, 7, 1, 3)),
            nn.Sequential(*stage(16, 32, 2)),
            nn.Sequential(*stage(32, 64, 3)),
            nn.Sequential(*stage(64, 128, 2)),
            nn.Sequential(*stage(128, 256, 2)),
            nn.Sequential(*stage(256, 512, 1)),
            nn.Sequential(ConvUnit(512, 512, 3, 1, 0), ConvUnit(512, embedding_dim, 1, 1, 0)),
        ])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class IMR(nn.Module):
    """Identity-Motion Reconfigurator (docs/method.md §5): tokens [1, N, E] + source / T target motions →
    [T, N, E]."""

    def __init__(self, dim: int = 1024, heads: int = 16, head_dim: int = 64, num_queries: int = 4,
                 embedding_dim: int = 768, txt_dim: int = 768, ff_mult: int = 4, disentangle_depth: int = 1,
                 entangle_depth: int = 1):
        super().__init__()
        self.dim, self.num_queries = dim, num_queries
        self.feature_fusion = nn.Sequential(
            nn.LayerNorm(embedding_dim + txt_dim), nn.Linear(embedding_dim + txt_dim, dim), nn.GELU(),
            nn.LayerNorm(dim), nn.Linear(dim, num_queries * dim), nn.GELU())
        self.norm_in = nn.LayerNorm(embedding_dim)
        self.proj_in = nn.Linear(embedding_dim, dim)

        def blocks(n):
            return nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, heads, head_dim),
                                                MultAttention(dim, heads, head_dim), feed_forward(dim, ff_mult)])
                                 for _ in range(n))

        self.disentangleNet = blocks(disentangle_depth)
        self.entangleNet = blocks(entangle_depth)
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, embedding_dim)

    def motion(self, landmark_feat, text_feat):
        psi = self.feature_fusion(torch.cat([landmark_feat, text_feat], dim=-1))
        return psi.reshape(psi.shape[0], self.num_queries, self.dim)

    @staticmethod
    def _run(net, x, psi):
        for cross, self_attn, ff in net:
            x = x + cross(psi, x)
            x = x + self_attn(x)
            x = x + ff(x)
        return x

    def forward(self, id_tokens, src_landmark, tgt_landmark, src_text, tgt_text):
        psi_src = self.motion(src_landmark, src_text)
        psi_tgt = self.motion(tgt_landmark, tgt_text)
        x = self._run(self.disentangleNet, self.proj_in(self.norm_in(id_tokens)), psi_src)
        x = x.expand(psi_tgt.shape[0], -1, -1)
        x = self._run(self.entangleNet, x, psi_tgt)
        return self.proj_out(self.norm_out(x))


# ---------------------------------------------------------------------------------------------------------
# Random weights that exercise every parameter (non-trivial norms and BatchNorm statistics)
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Default-initialised Linear/Conv weights re-drawn from ``seed``; every norm gets a non-trivial affine
    (scale 1 ± noise, bias noise), every BatchNorm non-zero running mean and non-unit running variance."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(7)
    return module


@torch.no_grad()
def calibrate_batchnorm_(model: nn.Module, batches) -> nn.Module:
    """Run ``batches`` in train mode with cumulative averaging so the running statistics match real activations
    (keeps a deep random conv stack's eval-mode outputs O(1)); restores momentum 0.1 and eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_dict_numpy(module: nn.Module) -> dict:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
