"""PyTorch reference of mmdet 2.x ``FPN`` (parity spec section 5), test reference only.

Key layout (mmcv ``ConvModule`` without norm/activation, so each conv lives under ``.conv``):

* ``lateral_convs.{i}.conv``: 1x1, ``in_channels[start_level + i] -> out_channels``, bias;
* ``fpn_convs.{i}.conv``: 3x3 pad 1, ``out_channels -> out_channels``, bias;
* extra convs (``add_extra_convs`` set): ``fpn_convs.{n_used}.conv`` (first extra, 3x3 s2 p1 on the source picked by
  ``add_extra_convs``: 'on_input' = the last used backbone input, 'on_lateral', 'on_output'), then
  ``fpn_convs.{n_used+1..}.conv`` (3x3 s2 p1 on the previous output, ReLU in between only when
  ``relu_before_extra_convs``).

RetinaNet: ``FPN([C2, C3, C4, C5], 256, num_outs=5, start_level=1, add_extra_convs='on_input')``.
Mask R-CNN: ``FPN([C2, C3, C4, C5], 256, num_outs=5)`` whose P6 is ``max_pool2d(P5, 1, stride=2)``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvModule", "FPN"]


class ConvModule(nn.Module):
    """Minimal mmcv ``ConvModule``: ``conv`` (with bias) optionally followed by an in-place-free ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=True)
        self.with_relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.with_relu else x


class FPN(nn.Module):
    """mmdet 2.11 ``FPN`` (no norm, no activation, nearest top-down by target size).

    ``in_channels`` lists ALL backbone outputs (as in mmdet configs); ``start_level`` picks the first one used;
    ``end_level=-1`` uses up to the last one. ``forward(inputs)`` takes the full list of backbone maps (NCHW) and
    returns a tuple of ``num_outs`` maps.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5, start_level: int = 0,
                 end_level: int = -1, add_extra_convs: Union[bool, str] = False,
                 relu_before_extra_convs: bool = False, init: bool = True):
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = int(out_channels)
        self.num_ins = len(self.in_channels)
        self.num_outs = int(num_outs)
        self.relu_before_extra_convs = bool(relu_before_extra_convs)
        if end_level == -1:
            self.backbone_end_level = self.num_ins
            assert self.num_outs >= self.num_ins - start_level
        else:
            # mmdet 2.11 semantics: end_level is exclusive and no extra level is allowed
            self.backbone_end_level = end_level
            assert end_level <= self.num_ins
            assert self.num_outs == end_level - start_level
        self.start_level = int(start_level)
        if add_extra_convs is True:
            add_extra_convs = "on_input"  # mmdet 2.x maps True to 'on_input' (extra_convs_on_inputs default True)
        assert add_extra_convs in (False, "on_input", "on_lateral", "on_output"), add_extra_convs
        self.add_extra_convs = add_extra_convs

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(self.start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvModule(self.in_channels[i], self.out_channels, 1))
            self.fpn_convs.append(ConvModule(self.out_channels, self.out_channels, 3, padding=1))
        n_used = self.backbone_end_level - self.start_level
        extra_levels = self.num_outs - n_used
        if self.add_extra_convs and extra_levels >= 1:
            for i in range(extra_levels):
                if i == 0 and self.add_extra_convs == "on_input":
                    cin = self.in_channels[self.backbone_end_level - 1]
                else:
                    cin = self.out_channels
                self.fpn_convs.append(ConvModule(cin, self.out_channels, 3, stride=2, padding=1))
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmdet: ``xavier_init(m, distribution='uniform')`` on every Conv2d (gain 1, bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1.0)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        assert len(inputs) == self.num_ins, (len(inputs), self.num_ins)
        laterals: List[torch.Tensor] = [conv(inputs[i + self.start_level])
                                        for i, conv in enumerate(self.lateral_convs)]
        n_used = len(laterals)
        for i in range(n_used - 1, 0, -1):
            prev_shape = laterals[i - 1].shape[2:]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=prev_shape, mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n_used)]
        if self.num_outs > n_used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - n_used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    src = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    src = laterals[-1]
                else:
                    src = outs[-1]
                outs.append(self.fpn_convs[n_used](src))
                for i in range(n_used + 1, self.num_outs):
                    prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](prev))
        return tuple(outs)
