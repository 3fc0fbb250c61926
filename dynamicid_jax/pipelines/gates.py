"""Where DynamicID injected identity: the SAA gates of a generation, grouped by UNet block, and a PNG overlay.

Every cross-attention of the SAA UNet computes a per-query gate ``w`` (docs/method.md §4.3;
:mod:`dynamicid_jax.methods.saa`) that scales the ID branch. :class:`GateMaps` holds those gates for one
generation — per layer, **averaged over the denoising steps**, for the conditional (prompt + identities) rows of
classifier-free guidance — together with the boxes and mode the generation used, so the regions where each
identity's tokens were visible can be shown:

* routing (one box per identity): identity ``i`` is visible in its box and outside every box;
* mixing (one box, several identities) or a single identity: every identity is visible everywhere.

:func:`save_gate_overlay` draws one row per UNet block that has cross-attention (``down_blocks_0``, …,
``mid_block``, …, ``up_blocks_3``) plus a row for the mean of all layers, and one column per identity: the
generated image tinted in the identity's colour where ``w`` is large (full tint at ``max(1, largest gate)``, so
boosted gates above 1 stay visible), with the identity's box outlined.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np

from flax import traverse_util

from dynamicid_jax.methods.saa import box_edges, layer_grid

__all__ = ["gate_maps", "GateMaps", "gate_overlay_image", "save_gate_overlay", "IDENTITY_COLOURS"]

def gate_maps(intermediates: Mapping, image_size: tuple[int, int]) -> dict[str, jax.Array]:
    """The sown gates (``apply(..., mutable=["intermediates"])[1]["intermediates"]``) as ``{layer path:
    [B, H_l, W_l]}``, e.g. ``"up_blocks_3/attentions_2/transformer_blocks_0/attn2"`` → ``[2, 64, 64]``."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(intermediates)).items():
        if path[-1] != "gate":
            continue
        w = value[0] if isinstance(value, tuple) else value
        gh, gw = layer_grid(w.shape[-1], image_size)
        out["/".join(path[:-1])] = w.reshape(w.shape[0], gh, gw)
    return out


#: tint of identity i (cycled)
IDENTITY_COLOURS = ((230, 40, 40), (40, 110, 240), (40, 190, 70), (240, 170, 20), (170, 60, 220), (20, 200, 200))
_BLOCK_ORDER = ("down_blocks", "mid_block", "up_blocks")


@dataclasses.dataclass
class GateMaps:
    """SAA gates of one generation (see the module docstring).

    Attributes:
      maps: cross-attention layer path (e.g. ``"up_blocks_3/attentions_2/transformer_blocks_0/attn2"``) →
        float32 ``[B, H_l, W_l]``: the gate averaged over the denoising steps, one row per generated image.
      boxes: float ``[n_boxes, 4]`` normalised ``[y0, x0, y1, x1]`` the generation used.
      mode: ``"route"`` (one box per identity) or ``"mix"`` (one box for several identities).
      num_ids: number of identities.
      image_size: ``(height, width)`` of the generated images in pixels.
      activate_query: whether the gate was on (``False`` → every gate is 1, no routing).
    """

    maps: dict[str, np.ndarray]
    boxes: np.ndarray
    mode: str
    num_ids: int
    image_size: tuple[int, int]
    activate_query: bool = True

    def __post_init__(self):
        if not self.maps:
            raise ValueError("GateMaps: no gate maps (was the UNet run with the SAA strategy?)")
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        self.maps = {k: np.asarray(v, np.float32) for k, v in self.maps.items()}
        for name, m in self.maps.items():
            if m.ndim != 3:
                raise ValueError(f"GateMaps: map {name!r} must be [B, H_l, W_l], got shape {m.shape}")

    @property
    def batch(self) -> int:
        return next(iter(self.maps.values())).shape[0]

    def groups(self) -> dict[str, np.ndarray]:
        """Block name → the mean of its layers' maps ``[B, H_l, W_l]`` (a block's layers share one grid), in UNet
        forward order: down blocks, mid block, up blocks."""
        by_block: dict[str, list[np.ndarray]] = {}
        for name, m in self.maps.items():
            by_block.setdefault(name.split("/")[0], []).append(m)

        def order(block: str):
            kind = next((i for i, k in enumerate(_BLOCK_ORDER) if block.startswith(k)), len(_BLOCK_ORDER))
            return kind, int(block.rsplit("_", 1)[-1]) if block[-1].isdigit() else 0

        return {b: np.mean(np.stack(by_block[b]), axis=0) for b in sorted(by_block, key=order)}

    def identity_masks(self, grid: tuple[int, int]) -> np.ndarray:
        """Boolean ``[num_ids, H_l, W_l]``: where identity ``i``'s tokens are visible on a layer grid (routing:
        inside box ``i`` or outside every box; mixing, one identity or the gate off: everywhere). Box edges follow
        the SAA rule (``int()`` truncation, half-open)."""
        gh, gw = grid
        if self.mode != "route" or self.num_ids == 1 or not self.activate_query:
            return np.ones((self.num_ids, gh, gw), bool)
        inside = np.zeros((self.num_ids, gh, gw), bool)
        for i, (y0, x0, y1, x1) in enumerate(box_edges(self.boxes, grid)):
            inside[i, y0:y1, x0:x1] = True
        return inside | ~inside.any(axis=0, keepdims=True)

    def identity_maps(self, batch_index: int = 0) -> dict[str, np.ndarray]:
        """Row name (each block, then ``"all layers"``) → ``[num_ids, H, W]`` at image resolution: the gate where
        identity ``i`` was visible, 0 elsewhere (nearest-neighbour upsampling of each layer's grid)."""
        if not 0 <= batch_index < self.batch:
            raise ValueError(f"batch_index must be in [0, {self.batch}), got {batch_index}")
        rows, total = {}, []
        for block, m in self.groups().items():
            grid = m.shape[1:]
            per_id = m[batch_index][None] * self.identity_masks(grid)
            rows[block] = np.stack([_upsample(x, self.image_size) for x in per_id])
        for m in self.maps.values():
            per_id = m[batch_index][None] * self.identity_masks(m.shape[1:])
            total.append(np.stack([_upsample(x, self.image_size) for x in per_id]))
        rows["all layers"] = np.mean(np.stack(total), axis=0)
        return rows


def _upsample(grid_map: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour to ``(H, W)`` px: a UNet grid cell covers ``ratio × ratio`` px (the SAA grid rule), so
    pixel ``(y, x)`` reads cell ``(y // ratio, x // ratio)`` (clipped at the far edges)."""
    height, width = image_size
    gh, gw = grid_map.shape
    ry, rx = max(1, height // gh), max(1, width // gw)
    rows = np.minimum(np.arange(height) // ry, gh - 1)
    cols = np.minimum(np.arange(width) // rx, gw - 1)
    return grid_map[rows][:, cols]


def gate_overlay_image(gates: GateMaps, image: np.ndarray, *, batch_index: int = 0, cell: int | None = None,
                       alpha: float = 0.65) -> np.ndarray:
    """The overlay grid as ``uint8 [rows·cell_h + header, columns·cell_w + label, 3]`` (see the module docstring).

    ``image`` is the generated ``uint8 [H, W, 3]`` (or ``[B, H, W, 3]``, then ``batch_index`` picks one);
    ``cell`` is the longer side of one panel in pixels (default ``min(256, max(H, W))``)."""
    from PIL import Image, ImageDraw

    img = np.asarray(image)
    if img.ndim == 4:
        img = img[batch_index]
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be a uint8 [H, W, 3] (or [B, H, W, 3]) image, got {img.dtype} {img.shape}")
    if tuple(img.shape[:2]) != tuple(gates.image_size):
        raise ValueError(f"image is {img.shape[0]}×{img.shape[1]} px but the gates belong to a "
                         f"{gates.image_size[0]}×{gates.image_size[1]} px generation")
    rows = gates.identity_maps(batch_index)
    height, width = gates.image_size
    longest = cell or min(256, max(height, width))
    scale = longest / max(height, width)
    ch, cw = max(1, round(height * scale)), max(1, round(width * scale))
    vmax = max(1.0, max(float(v.max()) for v in rows.values()))
    label_w, header_h, pad = 110, 18, 2
    canvas = Image.new("RGB", (label_w + gates.num_ids * (cw + pad), header_h + len(rows) * (ch + pad)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    base = img.astype(np.float32)
    for i in range(gates.num_ids):
        draw.text((label_w + i * (cw + pad) + 4, 3), f"identity {i}", fill=(0, 0, 0))
    for r, (name, per_id) in enumerate(rows.items()):
        y = header_h + r * (ch + pad)
        draw.text((4, y + ch // 2 - 6), name, fill=(0, 0, 0))
        for i in range(gates.num_ids):
            colour = np.array(IDENTITY_COLOURS[i % len(IDENTITY_COLOURS)], np.float32)
            a = (alpha * np.clip(per_id[i] / vmax, 0.0, 1.0))[..., None]
            tinted = np.clip(np.round(base * (1 - a) + colour * a), 0, 255).astype(np.uint8)
            panel = Image.fromarray(tinted).resize((cw, ch), Image.Resampling.BILINEAR)
            pd = ImageDraw.Draw(panel)
            for b in _boxes_of(gates, i):
                y0, x0, y1, x1 = b
                pd.rectangle([x0 * cw, y0 * ch, x1 * cw - 1, y1 * ch - 1],
                             outline=tuple(int(c) for c in colour), width=max(1, cw // 128))
            canvas.paste(panel, (label_w + i * (cw + pad), y))
    return np.asarray(canvas)


def _boxes_of(gates: GateMaps, identity: int) -> list:
    if not gates.activate_query:
        return []
    if gates.mode == "route":
        return [gates.boxes[identity]] if identity < len(gates.boxes) else []
    return [gates.boxes[0]]


def save_gate_overlay(gates: GateMaps, image: np.ndarray, path: str | os.PathLike, **kwargs) -> str:
    """Write :func:`gate_overlay_image` as a PNG (atomically) and return the path."""
    from dynamicid_jax.file_io import save_png

    return save_png(gate_overlay_image(gates, image, **kwargs), path)
