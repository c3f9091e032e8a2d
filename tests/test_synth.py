"""The synthetic dataset: deterministic bytes, object sizes for every FPN level, valid COCO, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from frcnn.runtime.cli import main as frcnn_main
from frcnn.runtime.errors import UserError
from frcnn.trainer.data import load_coco_split, synthesize_dataset
from frcnn.trainer.data.synth import render_image
from PIL import Image
from pycocotools.coco import COCO


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    # "b" renders in 2 worker processes: the output must not depend on it
    for name, seed, workers in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        synthesize_dataset(tmp_path / name, num_images=5, size=96, num_classes=3, seed=seed, workers=workers)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert sorted(a) == [
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        "train/000001.png",
        "train/000002.png",
        "train/000003.png",
        "train/000004.png",
        "val/000005.png",
    ]
    assert a == b
    assert a["train/000001.png"] != c["train/000001.png"]
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


@pytest.fixture(scope="module")
def dataset50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth50")
    synthesize_dataset(out, num_images=50, size=160, num_classes=6, seed=0, val_fraction=0.2)
    return out


def test_sizes_span_all_fpn_levels(dataset50: Path) -> None:
    boxes = []
    for split in ("train", "val"):
        doc = json.loads((dataset50 / "annotations" / f"instances_{split}.json").read_text())
        boxes += [a["bbox"] for a in doc["annotations"]]
    wh = np.array(boxes)[:, 2:]
    assert wh.min(axis=1).min() <= 12  # P2-sized objects
    assert wh.max(axis=1).max() >= 0.5 * 160  # P5 / P6-sized objects
    sqrt_area = np.sqrt(wh.prod(axis=1))
    # the ROI level rule floor(4 + log2(sqrt(area) / 224)) reaches levels 2 and >= 3 at this image size
    levels = np.clip(np.floor(4 + np.log2(sqrt_area / 224 + 1e-8)), 2, 5)
    assert {2.0, 3.0} <= set(levels.tolist())


def test_json_is_valid_coco_and_boxes_match_pixels(dataset50: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(dataset50 / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 40
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
        "circle",
        "square",
        "triangle",
        "ring",
        "cross",
        "diamond",
    ]
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2, 3, 4, 5, 6}
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    overlaps = 0
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) >= 1
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 160 and y + h <= 160 and w >= 1 and h >= 1
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
        xyxy = np.array(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ]
        )
        for i in range(len(xyxy)):
            for j in range(i + 1, len(xyxy)):
                overlaps += int(
                    np.all(np.maximum(xyxy[i, :2], xyxy[j, :2]) < np.minimum(xyxy[i, 2:], xyxy[j, 2:]))
                )
    assert overlaps > 10  # shapes overlap (occlusion happens)
    dicts, meta = load_coco_split(dataset50, "val")
    assert len(dicts) == 10 and meta.thing_dataset_ids == (1, 2, 3, 4, 5, 6)
    with Image.open(dicts[0]["file_name"]) as im:
        assert im.size == (160, 160) and im.mode == "RGB"


def test_cli_writes_and_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    args = [
        "data",
        "synth",
        str(out),
        "--images",
        "4",
        "--size",
        "64",
        "--classes",
        "2",
        "--seed",
        "1",
        "--val-fraction",
        "0.25",
    ]
    assert frcnn_main(args) == 0
    assert "train 3 images" in capsys.readouterr().out
    assert frcnn_main(args) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert frcnn_main([*args, "--overwrite"]) == 0
    assert frcnn_main(["data", "synth", str(tmp_path / "x"), "--classes", "9"]) == 2
    assert "--classes must be in 1..8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert frcnn_main(["data", "check", str(out)]) == 0
    assert "val: 1 images" in capsys.readouterr().out
    with pytest.raises(UserError, match="leaves no training image"):
        synthesize_dataset(tmp_path / "y", num_images=1, val_fraction=0.6)


def test_data_cli_does_not_import_torch() -> None:
    code = (
        "import sys, frcnn.trainer.data, frcnn.trainer.data.cli, frcnn.trainer.evaluation\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_difficulty_knobs_bound_sizes_counts_and_clutter(tmp_path: Path) -> None:
    """--min-side / --max-shapes / --clutter do what they say; the defaults keep the old bytes."""
    easy: dict = {"num_images": 12, "size": 128, "num_classes": 3, "seed": 5, "workers": 1}
    synthesize_dataset(tmp_path / "one", min_side=24, max_shapes=1, clutter=0, **easy)
    synthesize_dataset(tmp_path / "few", max_shapes=2, **easy)
    synthesize_dataset(tmp_path / "default", **easy)
    synthesize_dataset(tmp_path / "explicit", min_side=8, max_shapes=8, clutter=15, **easy)
    assert _files(tmp_path / "default") == _files(tmp_path / "explicit")
    one = [
        json.loads((tmp_path / "one" / "annotations" / f"instances_{s}.json").read_text())
        for s in ("train", "val")
    ]
    boxes = np.array([a["bbox"] for doc in one for a in doc["annotations"]])
    # one shape, nothing occludes it; at most 1/5 of its side sticks out of the image on each side
    assert len(boxes) == 12 and boxes[:, 2:].min() >= 0.6 * 24
    assert one[0]["info"]["min_side"] == 24 and one[0]["info"]["clutter"] == 0
    few = json.loads((tmp_path / "few" / "annotations" / "instances_train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in few["annotations"]])
    assert per_image.max() <= 2
    # the same rng draws lines into the background only when clutter > 0
    plain, _ = render_image(128, 1, np.random.default_rng(7), max_shapes=1, clutter=0)
    lined, _ = render_image(128, 1, np.random.default_rng(7), max_shapes=1, clutter=15)
    assert not np.array_equal(plain, lined)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--min-side", "2", "--min-side must be in 4..25"), ("--min-side", "30", "--min-side must be in 4..25"),
     ("--max-shapes", "0", "--max-shapes must be >= 1"), ("--clutter", "-1", "--clutter must be >= 0")],
)  # fmt: skip
def test_cli_refuses_bad_difficulty(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str,
                                    message: str) -> None:  # fmt: skip
    out = tmp_path / "ds"
    assert frcnn_main(["data", "synth", str(out), "--images", "4", "--size", "64", flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
