"""Data: COCO-format tfds builder, synthetic COCO, tf.data input pipeline (docs/data.md).

Names are imported lazily so that ``lit_jax.data.synthetic`` (numpy/cv2 only) does not pull in TensorFlow.
"""
import importlib

_EXPORTS = {
    "DataConfig": "config",
    "make_train_dataset": "pipeline",
    "make_eval_dataset": "pipeline",
    "GlobalBatches": "pipeline",
    "TrainData": "pipeline",
    "EvalData": "pipeline",
    "default_canvases": "image",
    "assign_buckets": "image",
    "prepare_image": "image",
    "open_source": "sources",
    "build": "coco_builder",
    "load_builder": "coco_builder",
    "CocoFormatError": "coco_builder",
    "make_synthetic_coco": "synthetic",
    "ensure_synthetic_tfds": "synthetic",
    "rescale_size": "image",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
