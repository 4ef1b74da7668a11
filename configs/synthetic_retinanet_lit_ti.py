"""The embedded default: RetinaNet LIT-Ti trained from scratch on the synthetic shapes dataset, on CPU.

The dataset is generated and prepared on first use (section ``synthetic``). Reduced from the COCO config so the
whole job (data, training, evaluation) finishes in about 13 minutes on 2 CPU cores, as README states:
* backbone: LIT-Ti widths and heads, but depths 1/1/2/1 instead of 3/4/6/3 (the full depth triples the step
  time on CPU); set ``--config.model.backbone_args.depths="(3, 4, 6, 3)"`` for the full architecture;
* images resized to 320x192 canvases; FPN and head 64 channels with 2 stacked convs; 6 classes;
* AdamW lr 3e-4 with gradient clipping at norm 5 and a 100-step warmup: without ImageNet weights, the original's
  lr 1e-4 learns too slowly for a 12-epoch CPU run, and lr 1e-3 without clipping diverged (docs/benchmarks.md);
* BatchNorm statistics and loss normaliser per 2-image group, assigner, focal loss, step schedule: as COCO.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_retinanet import retinanet_config  # noqa: E402
from base_synthetic import apply_synthetic_cpu_settings  # noqa: E402


def get_config():
    c = apply_synthetic_cpu_settings(retinanet_config("lit_ti"))
    c.model.head.feat_channels = 64
    c.model.head.stacked_convs = 2
    return c
