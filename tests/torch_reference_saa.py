"""PyTorch oracle for SAA: diffusers attention processors with the official parameter names (docs/method.md §4).

``SAProcessorRef`` (self-attention: four LoRAs) and ``SAAProcessorRef`` (cross-attention: LoRAs + the gated,
routed, boosted ID branch) follow diffusers' processor API ``__call__(attn, hidden_states,
encoder_hidden_states=None, attention_mask=None, temb=None, ...)``, so ``unet.set_attn_processor`` installs them
and ``torch.nn.ModuleList(unet.attn_processors.values()).state_dict()`` is an ``SAA_module`` in the official
layout. Written independently of our JAX code, step by step in the order of the specification, with the
official module's conventions: logits as ``(q·d^-¼)(k·d^-¼)ᵀ``, the box grid rule that only uses the image
size for non-square images, in-place slice assignment on ``[B, heads, H_l, W_l, T]`` logits.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRAProjection(nn.Module):
    """``up(down(x))``; parameter names ``down.weight [r, in]``, ``up.weight [out, r]``."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)  # [B, heads, L, d]


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


class _LoRAProcessor(nn.Module):
    def __init__(self, hidden_size: int, cross_attention_dim: int | None, rank: int):
        super().__init__()
        src = cross_attention_dim or hidden_size
        self.to_q_lora = LoRAProjection(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRAProjection(src, hidden_size, rank)
        self.to_v_lora = LoRAProjection(src, hidden_size, rank)
        self.to_out_lora = LoRAProjection(hidden_size, hidden_size, rank)

    @staticmethod
    def _check(attn, hidden_states):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("reference processors cover SD's transformer-block attention only")

    def _finish(self, attn, h, residual):
        out = attn.to_out[0](h) + self.to_out_lora(h)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SAProcessorRef(_LoRAProcessor):
    """Self-attention with LoRA on q, k, v and out."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__(hidden_size, None, rank)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self._check(attn, hidden_states)
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _heads(attn.to_q(hidden_states) + self.to_q_lora(hidden_states), attn.heads)
        k = _heads(attn.to_k(src) + self.to_k_lora(src), attn.heads)
        v = _heads(attn.to_v(src) + self.to_v_lora(src), attn.heads)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        return self._finish(attn, _merge(probs @ v), hidden_states)


class SAAProcessorRef(_LoRAProcessor):
    """Cross-attention: LoRA'd text attention + the gated ID branch on the last ``num_tokens · num_ids`` tokens.

    Per-call settings are plain attributes (set by :meth:`configure`): ``num_ids``, ``boxes`` (list of
    normalised ``[y0, x0, y1, x1]``), ``id_scale``, ``strength`` (the boost s of this step), ``mix``,
    ``activate_query``, ``image_size`` ``(H, W)`` px, ``threshold``, ``eps``. ``last_gate`` keeps the gate."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, rank: int, num_tokens: int = 4):
        super().__init__(hidden_size, cross_attention_dim, rank)
        self.num_tokens = num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.configure()

    def configure(self, num_ids=1, boxes=None, id_scale=1.0, strength=0.0, mix=0.5, activate_query=True,
                  image_size=(512, 512), threshold=0.3, eps=1e-6):
        self.num_ids, self.id_scale, self.strength, self.mix = num_ids, id_scale, strength, mix
        self.boxes = [[0.0, 0.0, 1.0, 1.0]] if boxes is None else [list(map(float, b)) for b in boxes]
        self.activate_query, self.image_size = activate_query, image_size
        self.threshold, self.eps = threshold, eps
        self.last_gate = None

    def _grid(self, query_len):
        height, width = self.image_size
        if height == width:  # the official code uses the image size only for non-square images
            side = int(math.sqrt(query_len))
            return side, side
        ratio = int(math.sqrt(width * height // query_len))
        return height // ratio, width // ratio

    def _gate_route(self, score):
        """score [B, heads, Lq, T] → (routed/mixed score, gate [B, Lq])."""
        b, heads, lq, t = score.shape
        g = score.permute(0, 2, 1, 3).reshape(b, lq, -1).sum(-1)
        lo = g.min(dim=1, keepdim=True).values
        hi = g.max(dim=1, keepdim=True).values
        w = (g - lo) / (hi - lo + self.eps)
        w[w < self.threshold] = 0
        s = float(self.strength)
        gh, gw = self._grid(lq)
        w = w.reshape(b, gh, gw) / (s + 1)
        score = score.clone().reshape(b, heads, gh, gw, t)
        n = self.num_tokens
        for i, (y0, x0, y1, x1) in enumerate(self.boxes):
            ys, xs = slice(int(y0 * gh), int(y1 * gh)), slice(int(x0 * gw), int(x1 * gw))
            w[:, ys, xs] = w[:, ys, xs] * (s + 1) + s
            for j in range(len(self.boxes)):
                if j != i:
                    score[:, :, ys, xs, j * n:(j + 1) * n] = float("-inf")
        score = score.reshape(b, heads, lq, t)
        if len(self.boxes) == 1 and t > n:
            score = torch.cat([score[..., :n] * self.mix, score[..., n:] * (1 - self.mix)], dim=-1)
        return score, w.reshape(b, lq)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self._check(attn, hidden_states)
        n_id = self.num_tokens * self.num_ids
        text, ids = encoder_hidden_states[:, :-n_id], encoder_hidden_states[:, -n_id:]
        heads = attn.heads
        q = _heads(attn.to_q(hidden_states) + self.to_q_lora(hidden_states), heads)
        k = _heads(attn.to_k(text) + self.to_k_lora(text), heads)
        v = _heads(attn.to_v(text) + self.to_v_lora(text), heads)
        d = q.shape[-1]
        h_txt = _merge(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v)

        k_id, v_id = _heads(self.to_k_ip(ids), heads), _heads(self.to_v_ip(ids), heads)
        quarter = d ** -0.25
        score = (q * quarter) @ (k_id * quarter).transpose(-1, -2)
        if self.activate_query:
            score, w = self._gate_route(score)
        else:
            w = torch.ones(score.shape[0], score.shape[2], dtype=score.dtype)
        self.last_gate = w.detach().clone()
        h_id = _merge(torch.softmax(score.float(), dim=-1).to(score.dtype) @ v_id)
        h = h_txt + self.id_scale * (w.unsqueeze(-1) * h_id)
        return self._finish(attn, h, hidden_states)


def saa_processors(unet, rank: int, num_tokens: int = 4) -> dict:
    """Fresh reference processors for every attention layer of a diffusers UNet, keyed as
    ``unet.attn_processors`` (sizes derived from the layer's own projections)."""
    procs = {}
    modules = dict(unet.named_modules())
    for key in unet.attn_processors:
        attn = modules[key.removesuffix(".processor")]
        hidden = attn.to_q.out_features
        if key.endswith("attn1.processor"):
            procs[key] = SAProcessorRef(hidden, rank)
        else:
            procs[key] = SAAProcessorRef(hidden, attn.to_k.in_features, rank, num_tokens)
    return procs


def configure_all(unet, **settings) -> None:
    for proc in unet.attn_processors.values():
        if isinstance(proc, SAAProcessorRef):
            proc.configure(**settings)
