"""Stage 1's face-weighted ε-MSE (``method.face_loss_weight``) and the face box the shard loader gives it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.schema import box_in_center_crop
from train.stage1 import face_weighted_mse


def _pred_target(inside_error: float, outside_error: float):
    """4×4 latents, 2 channels; the squared error is ``inside_error`` on the top-left 2×2 cells, else
    ``outside_error``."""
    err = np.full((1, 4, 4, 2), np.sqrt(outside_error), np.float32)
    err[:, :2, :2] = np.sqrt(inside_error)
    return jnp.asarray(err), jnp.zeros_like(jnp.asarray(err))


TOP_LEFT = jnp.asarray([[0.0, 0.0, 0.5, 0.5]])  # [y0, x0, y1, x1]


def test_weight_zero_is_the_plain_mean():
    pred, target = _pred_target(1.0, 0.25)
    got = face_weighted_mse(pred, target, None, 0.0)  # no box needed when the weight is 0
    np.testing.assert_allclose(float(got), float(jnp.mean(jnp.square(pred - target))), rtol=1e-7)


def test_face_cells_count_one_plus_weight_times():
    pred, target = _pred_target(1.0, 0.0)
    got = face_weighted_mse(pred, target, TOP_LEFT, 3.0)
    # 4 face cells of weight 4 with error 1, 12 cells of weight 1 with error 0 → 16 / (16 + 12)
    np.testing.assert_allclose(float(got), 16.0 / 28.0, rtol=1e-6)
    plain = face_weighted_mse(pred, target, TOP_LEFT, 0.0)
    assert float(got) > float(plain)  # the error sits in the face: weighting it raises the loss


def test_a_box_covering_everything_leaves_the_mean_unchanged():
    pred, target = _pred_target(1.0, 0.25)
    got = face_weighted_mse(pred, target, jnp.asarray([[0.0, 0.0, 1.0, 1.0]]), 5.0)
    np.testing.assert_allclose(float(got), float(jnp.mean(jnp.square(pred - target))), rtol=1e-6)


def test_a_positive_weight_without_boxes_is_refused():
    pred, target = _pred_target(1.0, 0.0)
    with pytest.raises(KeyError, match="target_face_box"):
        face_weighted_mse(pred, target, None, 1.0)


def test_box_in_center_crop_square_and_landscape():
    # a square image only scales: [x0, y0, x1, y1] = [10, 20, 50, 60] of 64 → [y0, x0, y1, x1] / 64
    np.testing.assert_allclose(box_in_center_crop(np.array([10, 20, 50, 60]), (64, 64), 32),
                               np.array([20, 10, 60, 50]) / 64, rtol=1e-6)
    # 100 × 50 → 64 × 32, the centre crop starts 16 px in: x 40..60 → 25.6..38.4 → 9.6..22.4 of 32
    np.testing.assert_allclose(box_in_center_crop(np.array([40, 0, 60, 25]), (100, 50), 32), [0.0, 0.3, 0.5, 0.7],
                               rtol=1e-6)
    # a box reaching outside the crop is clipped to it: x 0..30 → -16..3.2 → [0, 0.1]
    np.testing.assert_allclose(box_in_center_crop(np.array([0, 10, 30, 40]), (100, 50), 32)[[1, 3]], [0.0, 0.1],
                               rtol=1e-6, atol=1e-7)
