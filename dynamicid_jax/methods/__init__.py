"""DynamicID's trainable parts on top of Stable Diffusion: the ID encoder (docs/method.md §3) and the IMR
(docs/method.md §5)."""
from dynamicid_jax.methods.id_encoder import (IDEncoder, IDEncoderConfig, id_encoder_config,
                                              unconditional_clip_pixels, unconditional_id_tokens)
from dynamicid_jax.methods.imr import (IMR, DisentangleNet, EntangleNet, IMRConfig, KeyPointEncoder,
                                       KeyPointEncoderConfig, MotionFusion, imr_config, keypoint_encoder_config)

__all__ = [
    "IDEncoder", "IDEncoderConfig", "id_encoder_config", "unconditional_clip_pixels", "unconditional_id_tokens",
    "IMR", "IMRConfig", "imr_config", "MotionFusion", "DisentangleNet", "EntangleNet",
    "KeyPointEncoder", "KeyPointEncoderConfig", "keypoint_encoder_config",
]
