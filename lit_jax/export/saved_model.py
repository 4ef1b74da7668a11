"""TensorFlow SavedModel writer: ``jax2tf`` (native serialization) of :func:`lit_jax.export.serving.serving_fn`.

Layout under ``out``: ``saved_model.pb``, ``variables/`` (the detector's weights as TF variables, fed to the
embedded StableHLO module), ``assets/class_names.txt`` and ``assets/lit_jax_export.json``. Signatures:
``serving_default`` (images uint8 ``(B, H, W, 3)``, img_shape int32 ``(B, 2)``, scale_factor float32 ``(B, 4)``
-> the serving outputs) and ``class_names`` (no inputs -> ``class_names`` string ``(C,)``, ``category_ids``
int32 ``(C,)``). Loading needs TensorFlow only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Sequence

import numpy as np


def write_saved_model(serve, variables: dict, specs: Sequence, out: str, metadata: dict,
                      platforms: Sequence[str]) -> None:
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    from lit_jax.export import write_side_files

    paths, leaves, treedef = _flat(variables)
    tf_fn = jax2tf.convert(serve, with_gradient=False, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    module.weights = [tf.Variable(np.asarray(v), trainable=False, name=p.replace("/", "."))
                      for p, v in zip(paths, leaves)]

    def infer(images, img_shape, scale_factor):
        return tf_fn(jax.tree.unflatten(treedef, module.weights), images, img_shape, scale_factor)

    names = ("images", "img_shape", "scale_factor")
    signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=n) for n, s in zip(names, specs)]
    module.serve = tf.function(infer, input_signature=signature, autograph=False)
    class_names = tf.constant(metadata["class_names"], tf.string)
    category_ids = tf.constant(np.asarray(metadata["category_ids"], np.int32))
    module.class_names = tf.function(lambda: {"class_names": class_names, "category_ids": category_ids},
                                     input_signature=[], autograph=False)
    with tempfile.TemporaryDirectory() as tmp, stablehlo_target(TF_STABLEHLO_REQUIREMENT):
        names_file, meta_file = write_side_files(tmp, metadata)
        module.class_names_asset = tf.saved_model.Asset(names_file)
        module.metadata_asset = tf.saved_model.Asset(meta_file)
        tf.saved_model.save(module, out, signatures={
            "serving_default": module.serve.get_concrete_function(),
            "class_names": module.class_names.get_concrete_function()})
    assert os.path.isfile(os.path.join(out, "assets", os.path.basename(names_file)))


# TensorFlow 2.21's XlaCallModule reads StableHLO up to v1.13.7; jax 0.10 writes v1.15 by default (its 4-week
# window), which TF refuses ("failed to deserialize portable artifact"). The 12-week window gives v1.13.7.
TF_STABLEHLO_REQUIREMENT = "WEEK_12"


@contextlib.contextmanager
def stablehlo_target(requirement: str):
    """Serializes the StableHLO that ``jax.export`` (and so jax2tf) writes inside this block for consumers of
    ``requirement`` (a ``StablehloCompatibilityRequirement`` name) instead of jax's default 4-week window.

    jax has no public option for this: the block swaps ``jax._src.export._export._module_to_bytecode`` and
    restores it on exit."""
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jaxlib.mlir.dialects import stablehlo as hlo

    target = hlo.get_version_from_compatibility_requirement(getattr(hlo.StablehloCompatibilityRequirement,
                                                                    requirement))
    original = _export._module_to_bytecode

    def to_bytecode(module):
        return _jax.mlir.serialize_portable_artifact(module, target, xla_bridge.get_backend().serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield target
    finally:
        _export._module_to_bytecode = original


def _flat(variables: dict):
    """``('params/backbone/...', ...)``, the leaves as numpy, and the treedef to rebuild ``variables``."""
    import jax

    with_path, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in with_path]
    return paths, [np.asarray(v) for _, v in with_path], treedef
