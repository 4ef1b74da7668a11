"""Run a trained LIT detector on images from Python: ``load_detector(config, weights)(images)``.

See :mod:`lit_jax.inference.detector` for the API and docs/inference.md for the canvas modes and costs.
"""

from lit_jax.inference.detector import CANVAS_MODES, Detector, Result, load_detector
from lit_jax.inference.inputs import InputError, expand, read_image, video_frames
from lit_jax.inference.weights import Weights, WeightsError, load_weights

__all__ = ["CANVAS_MODES", "Detector", "InputError", "Result", "Weights", "WeightsError", "expand", "load_detector",
           "load_weights", "read_image", "video_frames"]
