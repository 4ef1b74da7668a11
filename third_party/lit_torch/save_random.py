"""Random-but-nontrivial LIT checkpoints in the original PyTorch layouts (test fixtures only).

    python -m third_party.lit_torch.save_random --model lit_ti --out X.pth [--variant det|cls]
        [--nest none|model|state_dict] [--prefix backbone.] [--seed 0] [--offset-scale 1.0]

Layouts:
* ``nest=None``: the bare state_dict;
* ``nest='model'``: ``{'model': state_dict}`` (the ImageNet release layout);
* ``nest='state_dict'``: ``{'meta': {...}, 'state_dict': state_dict}`` (mmcv / mmdet layout); for a detection
  checkpoint pass ``prefix='backbone.'`` so keys read ``backbone.patch_embed1.proj.weight`` etc.
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from typing import Dict, Optional

import torch
import torch.nn as nn

from .dcn import perturb_offsets_
from .lit_s import LITSCls, LITSDet, RelPosAttention
from .lit_ti import LITTiBackbone, LITTiCls, LITTiDet

__all__ = ["MODELS", "build_model", "randomize_", "count_params", "save_random_checkpoint", "main"]

MODELS = {
    ("lit_ti", "det"): LITTiDet,
    ("lit_ti", "cls"): LITTiCls,
    ("lit_s", "det"): LITSDet,
    ("lit_s", "cls"): LITSCls,
}

_NON_PARAM_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index")


def build_model(model_name: str, variant: str = "det", **kwargs) -> nn.Module:
    """``model_name`` in {'lit_ti', 'lit_s'} (also 'ti'/'s', 'lit-ti'...), ``variant`` in {'det', 'cls'}."""
    name = model_name.lower().replace("-", "_")
    name = {"ti": "lit_ti", "s": "lit_s"}.get(name, name)
    try:
        cls = MODELS[(name, variant)]
    except KeyError:
        raise ValueError(f"unknown model/variant {model_name!r}/{variant!r}; known: {sorted(MODELS)}") from None
    return cls(**kwargs)


def count_params(obj) -> int:
    """Sum of numel over a module's (or a state_dict's) entries, leaving out BN running stats,
    ``num_batches_tracked`` and the ``relative_position_index`` buffers (= the trainable parameter count)."""
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return int(sum(v.numel() for k, v in sd.items() if not k.endswith(_NON_PARAM_SUFFIXES)))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter/buffer that is constant or near-trivial at init a non-trivial random value, in place.

    * BatchNorm2d: weight 1+0.1*randn, bias 0.1*randn, running_mean 0.1*randn, running_var U(0.5, 2),
      num_batches_tracked 1000;
    * LayerNorm: weight 1+0.1*randn, bias 0.1*randn;
    * Linear biases (zero at init): 0.02*randn;
    * LIT-Ti pos_embed1-4: 0.2*randn; cls_token: 0.2*randn;
    * LIT-S relative_position_bias_table: 0.5*randn (so the resized bias visibly shapes attention).
    Weights of Linear/Conv layers keep their (already random) init; DCN offsets are left alone (use
    ``perturb_offsets_``). Deterministic given ``seed``. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen).to(t)

    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + 0.1 * rnd(m.weight))
            m.bias.copy_(0.1 * rnd(m.bias))
            m.running_mean.copy_(0.1 * rnd(m.running_mean))
            m.running_var.copy_((0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen)).to(m.running_var))
            m.num_batches_tracked.fill_(1000)
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.1 * rnd(m.weight))
            m.bias.copy_(0.1 * rnd(m.bias))
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                m.bias.copy_(0.02 * rnd(m.bias))
        elif isinstance(m, RelPosAttention):
            m.relative_position_bias_table.copy_(0.5 * rnd(m.relative_position_bias_table))
        if isinstance(m, LITTiBackbone):
            for k in (1, 2, 3, 4):
                p = getattr(m, f"pos_embed{k}")
                p.copy_(0.2 * rnd(p))
            if getattr(m, "cls_token", None) is not None:
                m.cls_token.copy_(0.2 * rnd(m.cls_token))
    return model


def save_random_checkpoint(model_name: str, path: Optional[str], seed: int = 0, variant: str = "det",
                           nest: Optional[str] = None, prefix: str = "", offset_scale: float = 1.0,
                           meta: Optional[Dict] = None) -> nn.Module:
    """Build ``model_name``/``variant`` (seeded), ``randomize_`` it, ``perturb_offsets_`` its DCN offsets, and
    ``torch.save`` its state_dict (keys prefixed with ``prefix``; nested per ``nest``) to ``path``.

    The model is returned in eval mode; its state equals the saved tensors (without the prefix).
    ``path=None`` skips writing.
    """
    if nest not in (None, "none", "model", "state_dict"):
        raise ValueError(f"nest must be None, 'model' or 'state_dict', got {nest!r}")
    torch.manual_seed(int(seed))
    model = build_model(model_name, variant)
    randomize_(model, seed=seed + 1)
    if offset_scale:
        perturb_offsets_(model, scale=offset_scale, seed=seed + 2)
    model.eval()
    sd = OrderedDict((prefix + k, v.detach().clone()) for k, v in model.state_dict().items())
    if nest in (None, "none"):
        obj = sd
    elif nest == "model":
        obj = {"model": sd}
    else:
        info = {"lit_torch_random": {"model": model_name, "variant": variant, "seed": int(seed),
                                     "offset_scale": float(offset_scale)}}
        if prefix.startswith("backbone."):
            info["mmdet_version"] = "2.11.0"
        if meta:
            info.update(meta)
        obj = {"meta": info, "state_dict": sd}
    if path is not None:
        torch.save(obj, path)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="lit_ti or lit_s")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", default="det", choices=["det", "cls"])
    ap.add_argument("--nest", default="none", choices=["none", "model", "state_dict"])
    ap.add_argument("--prefix", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offset-scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    model = save_random_checkpoint(a.model, a.out, seed=a.seed, variant=a.variant,
                                   nest=None if a.nest == "none" else a.nest, prefix=a.prefix,
                                   offset_scale=a.offset_scale)
    print(f"saved {a.model}/{a.variant} ({count_params(model):,} params) to {a.out}")


if __name__ == "__main__":
    main()
