"""A user's own dataset for the fine-tuning tests: a folder of images with COCO jsons of 3 classes, made from the
synthetic shapes (the other three classes' annotations removed)."""

import json
import os
import shutil

from lit_jax.data.synthetic import make_synthetic_coco

KEEP = (1, 2, 4)  # circle, square, triangle (the synthetic set's non-contiguous ids)


def make_three_class_folder(out: str, *, num_train: int = 12, num_val: int = 6, max_side: int = 96) -> list:
    """Writes ``out/images/*.jpg``, ``out/train.json`` and ``out/val.json``; returns the 3 class names."""
    src = os.path.join(out, "_synthetic")
    make_synthetic_coco(src, num_train=num_train, num_val=num_val, seed=1, max_side=max_side)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    names = []
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        with open(os.path.join(src, "annotations", f"instances_{folder}.json")) as f:
            coco = json.load(f)
        coco["categories"] = [c for c in coco["categories"] if c["id"] in KEEP]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in KEEP]
        names = [c["name"] for c in coco["categories"]]
        for image in coco["images"]:
            shutil.copy(os.path.join(src, folder, image["file_name"]), os.path.join(out, "images", image["file_name"]))
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(coco, f)
    shutil.rmtree(src)
    return names
