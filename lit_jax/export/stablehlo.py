"""Serialized StableHLO writer (``jax.export``) of :func:`lit_jax.export.serving.serving_fn`.

Layout under ``out``: ``model.jax_export`` (``Exported.serialize()`` bytes), ``weights.npz`` (the weights,
one array per ``'params/backbone/...'`` key), ``class_names.txt`` and ``lit_jax_export.json`` (inputs and
outputs with shapes and dtypes, canvas, normalisation, class names). Reload with jax alone::

    exp = jax.export.deserialize(open("out/model.jax_export", "rb").read())
    out = exp.call(dict(np.load("out/weights.npz")), images, img_shape, scale_factor)   # a dict of arrays
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

EXPORTED = "model.jax_export"
WEIGHTS = "weights.npz"


def write_stablehlo(serve, variables: dict, specs: Sequence, out: str, metadata: dict,
                    platforms: Sequence[str]) -> None:
    import jax

    from lit_jax.export import write_side_files
    from lit_jax.export.saved_model import _flat

    paths, leaves, _ = _flat(variables)
    flat = dict(zip(paths, leaves))

    def fn(weights, images, img_shape, scale_factor):
        return serve(unflatten(weights), images, img_shape, scale_factor)

    weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(weight_specs, *specs)
    with open(os.path.join(out, EXPORTED), "wb") as f:
        f.write(exported.serialize())
    np.savez(os.path.join(out, WEIGHTS), **flat)
    write_side_files(out, dict(metadata, files={"exported": EXPORTED, "weights": WEIGHTS}))


def unflatten(flat: dict) -> dict:
    """``{'a/b/c': x}`` -> ``{'a': {'b': {'c': x}}}``."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
