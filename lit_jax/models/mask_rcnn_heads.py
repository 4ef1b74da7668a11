"""Mask R-CNN heads with mmdetection 2.11 semantics: ``RPNHead``, ``Shared2FCBBoxHead``, ``FCNMaskHead``.

``shared/parity_spec.md`` §8-§10, §12 (keys), §14 items 8 and 13. Layout NHWC. Submodules are named after the
mmdet ``state_dict`` keys so :func:`lit_jax.convert.mapping.convert_state_dict` maps a checkpoint by its generic
rule (``rpn_head.rpn_conv.weight`` -> ``rpn_conv/kernel``, ``roi_head.bbox_head.shared_fcs.0.weight`` ->
``shared_fcs_0/kernel``, ``roi_head.mask_head.convs.2.conv.weight`` -> ``convs_2/conv/kernel``, ...), once the
``rpn_head.`` / ``roi_head.bbox_head.`` / ``roi_head.mask_head.`` prefix is routed to the head.

Two layout points need care (§14.8):

* ``Shared2FCBBoxHead`` receives NHWC RoI features ``(R, 7, 7, C)`` but the original flattens ``(R, C, 7, 7)``
  in **C, H, W** order, so the features are transposed to channel-first before flattening; the converted
  ``shared_fcs.0`` kernel ``(C*7*7, 1024)`` is then used as is (no row permutation).
* ``FCNMaskHead.upsample`` is PyTorch's ``ConvTranspose2d(C, C, 2, stride=2)``, whose weight is stored
  ``(in, out, kh, kw)``. The generic converter transposes every 4-D ``weight`` with ``(2, 3, 1, 0)``, which for
  this weight gives ``(kh, kw, out, in)``. :class:`ConvTranspose2d` declares exactly that parameter layout
  and computes ``out[s*i + a, s*j + b, o] = bias[o] + sum_c x[i, j, c] * kernel[a, b, o, c]`` (kernel = stride, no
  padding: each input pixel writes its own ``s x s`` output block, no overlap), which is torch's
  ``out[o, s*i + a, s*j + b] = bias[o] + sum_c x[c, i, j] * W[c, o, a, b]``. It is an einsum followed by a
  pixel shuffle: no tap flip to get wrong (Flax's ``nn.ConvTranspose`` needs ``transpose_kernel=True`` to
  match, see the tests).

Initialisers follow mmdet 2.11 (the ``init_weights`` of each head) so training from scratch starts alike;
checkpoints overwrite them.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lit_jax.models.fpn import ConvModule

Dtype = Any

__all__ = ["RPNHead", "Shared2FCBBoxHead", "FCNMaskHead", "ConvTranspose2d"]

_normal_001 = nn.initializers.normal(stddev=0.01)
_normal_0001 = nn.initializers.normal(stddev=0.001)
_xavier_uniform = nn.initializers.xavier_uniform()
# mmcv ``kaiming_init`` / ``nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu')``: N(0, 2 / fan_out)
# with fan_out = out_channels * kh * kw (HWIO: out axis -1, receptive field = the leading axes).
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _kaiming_fan_out_transposed(key, shape, dtype=jnp.float32):
    """torch ``kaiming_normal_(mode='fan_out')`` on a ConvTranspose2d weight ``(in, out, kh, kw)``: torch's
    fan_out is ``size(0) * kh * kw = in * kh * kw``. Our kernel is ``(kh, kw, out, in)``."""
    kh, kw, _, cin = shape
    std = np.sqrt(2.0 / (cin * kh * kw))
    return nn.initializers.normal(stddev=float(std))(key, shape, dtype)


class RPNHead(nn.Module):
    """mmdet ``RPNHead`` (§8): ``rpn_conv`` 3x3 + ReLU, then 1x1 ``rpn_cls`` (one sigmoid logit per anchor) and
    1x1 ``rpn_reg`` (4 deltas per anchor), shared over levels; init normal(0.01), zero bias.

    ``__call__(feats)``: tuple of ``(B, H_l, W_l, C)`` -> (logits list ``(B, H_l*W_l*A)``, deltas list
    ``(B, H_l*W_l*A, 4)``), float32, anchor order ``(y*W + x)*A + a`` (the order of
    :func:`lit_jax.ops.anchors.multilevel_anchors` and of mmdet's ``permute(0, 2, 3, 1).reshape``).
    """

    num_anchors: int = 3
    feat_channels: int = 256
    dtype: Dtype = jnp.float32

    def setup(self):
        conv = dict(kernel_init=_normal_001, dtype=self.dtype)
        self.rpn_conv = nn.Conv(self.feat_channels, (3, 3), padding=((1, 1), (1, 1)), **conv)
        self.rpn_cls = nn.Conv(self.num_anchors, (1, 1), padding="VALID", **conv)
        self.rpn_reg = nn.Conv(self.num_anchors * 4, (1, 1), padding="VALID", **conv)

    def __call__(self, feats: Sequence[jnp.ndarray]):
        cls_out, reg_out = [], []
        for x in feats:
            b = x.shape[0]
            h = nn.relu(self.rpn_conv(x))
            cls_out.append(self.rpn_cls(h).reshape(b, -1).astype(jnp.float32))
            reg_out.append(self.rpn_reg(h).reshape(b, -1, 4).astype(jnp.float32))
        return cls_out, reg_out


class Shared2FCBBoxHead(nn.Module):
    """mmdet ``Shared2FCBBoxHead`` (§9): flatten in C,H,W order -> ``shared_fcs_0`` + ReLU -> ``shared_fcs_1`` +
    ReLU -> ``fc_cls`` (``num_classes + 1`` logits, **background last**) and ``fc_reg`` (class-specific
    deltas ``4 * num_classes``, layout ``c * 4 + k``).

    ``__call__(x)``: RoI features ``(R, 7, 7, C)`` NHWC -> (cls ``(R, num_classes + 1)``,
    reg ``(R, 4 * num_classes)``), float32.
    """

    num_classes: int = 80
    fc_out_channels: int = 1024
    dtype: Dtype = jnp.float32

    def setup(self):
        fc = dict(kernel_init=_xavier_uniform, dtype=self.dtype)
        self.shared_fcs = [nn.Dense(self.fc_out_channels, **fc) for _ in range(2)]
        self.fc_cls = nn.Dense(self.num_classes + 1, kernel_init=_normal_001, dtype=self.dtype)
        self.fc_reg = nn.Dense(4 * self.num_classes, kernel_init=_normal_0001, dtype=self.dtype)

    def __call__(self, x):
        r = x.shape[0]
        # torch: x.flatten(1) on (R, C, H, W) -> index c*H*W + y*W + x.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(r, -1)
        for fc in self.shared_fcs:
            x = nn.relu(fc(x))
        return self.fc_cls(x).astype(jnp.float32), self.fc_reg(x).astype(jnp.float32)


class ConvTranspose2d(nn.Module):
    """PyTorch ``ConvTranspose2d(in, out, k, stride=k, padding=0)`` (kernel size == stride) on NHWC.

    Parameters: ``kernel`` ``(k, k, out, in)`` -- torch's ``weight (in, out, k, k)`` transposed ``(2, 3, 1, 0)``,
    which is what the generic converter produces -- and ``bias`` ``(out,)``.
    ``y[n, k*i + a, k*j + b, o] = bias[o] + sum_c x[n, i, j, c] * kernel[a, b, o, c]``.
    """

    features: int
    kernel_size: int = 2
    kernel_init: Any = _kaiming_fan_out_transposed
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        n, h, w, cin = x.shape
        kernel = self.param("kernel", self.kernel_init, (k, k, self.features, cin), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        y = jnp.einsum("nijc,aboc->niajbo", x, kernel.astype(self.dtype))  # (N, H, k, W, k, out)
        y = y.reshape(n, h * k, w * k, self.features)
        return y + bias.astype(self.dtype)


class FCNMaskHead(nn.Module):
    """mmdet ``FCNMaskHead`` (§10): ``convs_{0..3}`` (3x3, pad 1, ReLU) -> ``upsample`` (ConvTranspose2d k2 s2)
    + ReLU -> ``conv_logits`` 1x1 -> ``num_classes``.

    ``__call__(x)``: mask RoI features ``(R, 14, 14, C)`` -> logits ``(R, 28, 28, num_classes)`` float32
    (class-specific masks; take the label channel, then sigmoid).
    """

    num_classes: int = 80
    num_convs: int = 4
    conv_out_channels: int = 256
    dtype: Dtype = jnp.float32

    def setup(self):
        self.convs = [ConvModule(self.conv_out_channels, 3, padding=1, relu=True, kernel_init=_kaiming_fan_out,
                                 dtype=self.dtype) for _ in range(self.num_convs)]
        self.upsample = ConvTranspose2d(self.conv_out_channels, 2, dtype=self.dtype)
        self.conv_logits = nn.Conv(self.num_classes, (1, 1), padding="VALID", kernel_init=_kaiming_fan_out,
                                   dtype=self.dtype)

    def __call__(self, x):
        for conv in self.convs:
            x = conv(x)
        x = nn.relu(self.upsample(x))
        return self.conv_logits(x).astype(jnp.float32)
