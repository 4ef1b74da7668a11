"""The one output type of ``detector.predict`` for every detector (RetinaNet, Mask R-CNN)."""

from __future__ import annotations

from typing import Any, Optional

import flax


@flax.struct.dataclass
class DetectorOutput:
    """Padded detections of a batch, in original-image pixels, sorted by descending score per image.

    boxes ``(B, K, 4)`` float32 (x1, y1, x2, y2); scores ``(B, K)``; labels ``(B, K)`` int32 (-1 in empty slots);
    valid ``(B, K)`` bool. Detectors with masks also fill mask_probs ``(B, K, M, M)`` (probabilities of each
    detection's class on its box), mask_boxes ``(B, K, 4)`` (where the masks are pasted) and mask_valid
    ``(B, K)``; two-stage detectors fill proposals ``(B, P, 4)`` (resized-image pixels), proposal_scores and
    proposal_valid ``(B, P)``. Fields a detector does not produce are None. A pytree: jit and device_get
    work on it directly.
    """

    boxes: Any
    scores: Any
    labels: Any
    valid: Any
    mask_probs: Optional[Any] = None
    mask_boxes: Optional[Any] = None
    mask_valid: Optional[Any] = None
    proposals: Optional[Any] = None
    proposal_scores: Optional[Any] = None
    proposal_valid: Optional[Any] = None

    @property
    def has_masks(self) -> bool:
        return self.mask_probs is not None
