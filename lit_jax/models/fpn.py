"""Feature pyramid network with mmdetection 2.x semantics (``shared/parity_spec.md`` §5).

NHWC throughout. Submodule names follow mmdet's keys (``lateral_convs.0.conv`` -> ``lateral_convs_0/conv``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any

# mmdet's ConvModule / FPN init: xavier-uniform weights, zero bias.
xavier_uniform = nn.initializers.xavier_uniform()


class ConvModule(nn.Module):
    """A conv (mmcv ``ConvModule`` without norm), optional ReLU; holds the conv as ``conv`` like mmcv.

    ``padding`` is explicit ``((top, bottom), (left, right))`` or an int for symmetric padding, as PyTorch pads:
    Flax 'SAME' pads (0, 1) on a 3x3 stride-2 conv over an even size, PyTorch (1, 1).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    relu: bool = False
    kernel_init: Any = xavier_uniform
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.padding
        x = nn.Conv(
            self.features, (self.kernel_size, self.kernel_size), strides=(self.stride, self.stride),
            padding=((p, p), (p, p)), kernel_init=self.kernel_init, bias_init=self.bias_init, dtype=self.dtype,
            name="conv",
        )(x)
        return nn.relu(x) if self.relu else x


def resize_nearest(x, size: tuple[int, int]):
    """PyTorch ``F.interpolate(mode='nearest')`` on NHWC: source index ``floor(dst * in / out)``.

    For the 32-padded pyramid this is an exact 2x repeat; other sizes follow torch's (legacy) rule.
    """
    h, w = x.shape[1], x.shape[2]
    oh, ow = size
    iy = np.minimum(np.floor(np.arange(oh, dtype=np.float32) * np.float32(h / oh)).astype(np.int32), h - 1)
    ix = np.minimum(np.floor(np.arange(ow, dtype=np.float32) * np.float32(w / ow)).astype(np.int32), w - 1)
    if oh == 2 * h and ow == 2 * w:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, iy][:, :, ix]


class FPN(nn.Module):
    """mmdet ``FPN``: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs, extra levels.

    Attributes:
      out_channels: 256.
      num_outs: number of output levels (5 for both detectors).
      start_level: first backbone level used (RetinaNet 1: C3-C5; Mask R-CNN 0: C2-C5).
      add_extra_convs: ``'on_input'`` (RetinaNet): extra levels are 3x3 stride-2 convs, the first on the
        backbone's last input (C5), the next on the previous extra output, with no ReLU between them
        (``relu_before_extra_convs=False``). ``None`` (Mask R-CNN): extra levels are ``P5[::2, ::2]``
        (max-pool with kernel 1, stride 2).
    """

    out_channels: int = 256
    num_outs: int = 5
    start_level: int = 1
    add_extra_convs: Optional[str] = "on_input"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jnp.ndarray]):
        """feats: backbone maps NHWC, finest first -> tuple of ``num_outs`` maps ``(B, h_i, w_i, 256)``."""
        inputs = list(feats[self.start_level :])
        laterals = [
            ConvModule(self.out_channels, 1, dtype=self.dtype, name=f"lateral_convs_{i}")(x)
            for i, x in enumerate(inputs)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
        outs = [
            ConvModule(self.out_channels, 3, padding=1, dtype=self.dtype, name=f"fpn_convs_{i}")(lat)
            for i, lat in enumerate(laterals)
        ]
        n_extra = self.num_outs - len(outs)
        if n_extra > 0:
            if self.add_extra_convs is None:
                for _ in range(n_extra):
                    outs.append(outs[-1][:, ::2, ::2])
            elif self.add_extra_convs == "on_input":
                x = inputs[-1]
                for j in range(n_extra):
                    i = len(laterals) + j
                    x = ConvModule(self.out_channels, 3, stride=2, padding=1, dtype=self.dtype,
                                   name=f"fpn_convs_{i}")(x if j == 0 else outs[-1])
                    outs.append(x)
            else:
                raise ValueError(f"add_extra_convs={self.add_extra_convs!r} is not supported")
        return tuple(outs)
