"""The function both export formats serialize: uint8 canvas images in, padded detections out.

``serving_fn(model, mean, std, dtype)`` returns ``f(variables, images, img_shape, scale_factor) -> dict``:
images ``(B, H, W, 3)`` uint8 RGB, the resized image at the top-left of the canvas (whatever lies outside
``img_shape`` is ignored); img_shape ``(B, 2)`` int32 ``(h, w)`` after the resize; scale_factor ``(B, 4)`` float32
``(w_s, h_s, w_s, h_s)``. Normalisation runs inside: ``(x - mean) * (1/std)`` in float32 as
:func:`lit_jax.data.image.normalize_np`, then every pixel outside ``[0:h, 0:w]`` is set to 0, as the original
pads after normalising. Outputs (float32 unless said): boxes ``(B, K, 4)`` original-image pixels, scores
``(B, K)``, labels ``(B, K)`` int32 (-1 empty), valid ``(B, K)`` bool; with masks also mask_probs
``(B, K, 28, 28)``, mask_boxes ``(B, K, 4)`` (where to paste them, original-image pixels), mask_valid ``(B, K)``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

OUTPUTS = ("boxes", "scores", "labels", "valid")
MASK_OUTPUTS = ("mask_probs", "mask_boxes", "mask_valid")


def output_names(with_masks: bool) -> tuple:
    return OUTPUTS + (MASK_OUTPUTS if with_masks else ())


def normalize_and_mask(images_u8, img_shape, mean: Sequence[float], std: Sequence[float]):
    """float32 ``(B, H, W, 3)``: normalised inside each image's ``img_shape``, 0 outside."""
    mean32 = jnp.asarray(np.asarray(mean, np.float32))
    stdinv32 = jnp.asarray((1.0 / np.asarray(std, np.float64)).astype(np.float32))
    x = (images_u8.astype(jnp.float32) - mean32) * stdinv32
    h, w = images_u8.shape[1:3]
    img_shape = jnp.asarray(img_shape, jnp.int32)
    inside = ((jnp.arange(h)[None, :, None] < img_shape[:, 0, None, None])
              & (jnp.arange(w)[None, None, :] < img_shape[:, 1, None, None]))
    return jnp.where(inside[..., None], x, 0.0)


def serving_fn(model, mean: Sequence[float], std: Sequence[float]):
    """See the module docstring. The model's own dtype (``model.dtype`` config) sets the compute precision;
    floating outputs are cast to float32 so both precisions share one signature."""
    names = output_names(model.with_masks)

    def serve(variables, images, img_shape, scale_factor):
        x = normalize_and_mask(images, img_shape, mean, std)
        out = model.predict(variables, x, {"img_shape": jnp.asarray(img_shape, jnp.int32),
                                           "scale_factor": jnp.asarray(scale_factor, jnp.float32)})
        result = {}
        for name in names:
            v = getattr(out, name)
            result[name] = v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
        result["labels"] = result["labels"].astype(jnp.int32)
        return result

    return serve
