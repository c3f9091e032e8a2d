"""Instance masks in the data pipeline: COCO polygons / RLE checked and decoded, resized + flipped with the
image (DatasetMapper), the synthetic set's exact masks, and the trainer's targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from frcnn.runtime.errors import UserError
from frcnn.trainer.data.coco import load_coco_json
from frcnn.trainer.data.mapper import DatasetMapper
from frcnn.trainer.data.masks import check_segmentation, segmentation_to_mask, transform_mask
from frcnn.trainer.data.synth import render_image
from PIL import Image


def test_uncompressed_rle_decodes_column_major() -> None:
    # Hand-made COCO RLE on a 3 x 4 image: runs alternate 0/1 in column-major (Fortran) order.
    rle = {"size": [3, 4], "counts": [4, 3, 2, 3]}
    want = np.zeros((3, 4), bool)
    want.T.flat[4:7] = True  # pixels 4..6 in column-major order
    want.T.flat[9:12] = True
    check_segmentation(rle, 3, 4, "ann 1")
    assert np.array_equal(segmentation_to_mask(rle, 3, 4), want)


def test_polygon_and_compressed_rle_agree_on_a_rectangle() -> None:
    from pycocotools import mask as mask_util

    poly = [[2.0, 3.0, 10.0, 3.0, 10.0, 8.0, 2.0, 8.0]]
    mask = segmentation_to_mask(poly, 12, 16)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (3, 7, 2, 9)  # pycocotools' half-open rasterisation
    assert mask.sum() == 5 * 8
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = {"size": [12, 16], "counts": rle["counts"].decode("ascii")}
    check_segmentation(compressed, 12, 16, "ann 2")
    assert np.array_equal(segmentation_to_mask(compressed, 12, 16), mask)


@pytest.mark.parametrize("seg, message", [
    ([], "empty polygon list"),
    ([[1.0, 2.0, 3.0, 4.0]], "polygon 0 must be a flat list of >= 6 finite numbers"),
    ([[1.0, 2.0, 3.0, 4.0, 5.0, float("nan")]], "polygon 0 must be"),
    ([[1, 2, 3, 4, 5, 6, 7]], "polygon 0 must be"),
    ({"size": [10, 12], "counts": [120]}, r"RLE 'size' \[10, 12\] does not match the image's \[height, width\] \[12, 16\]"),
    ({"size": [12, 16], "counts": [100, 50]}, "uncompressed RLE 'counts' sum to 150, not height x width = 192"),
    ({"size": [12, 16], "counts": "d16"}, "truncated or corrupt"),
    ({"size": [12, 16]}, "RLE 'counts' must be a non-empty string"),
    ("0110", "must be a list of polygons or an RLE dict"),
])
def test_malformed_segmentation_is_one_clear_error(seg, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_segmentation(seg, 12, 16, "instances.json: annotations[3] (id 7)")


def test_loading_a_dataset_with_a_malformed_polygon_names_the_annotation(tmp_path: Path) -> None:
    Image.new("RGB", (16, 12)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 12, "width": 16}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
                             "segmentation": [[1, 1, 6, 1]]}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"annotations\[0\].*polygon 0 must be a flat list"):
        load_coco_json(tmp_path / "instances.json", tmp_path)


def test_mapper_resizes_and_flips_masks_with_the_image(tmp_path: Path) -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "b.png")
    poly = [10.0, 5.0, 50.0, 5.0, 50.0, 40.0, 10.0, 40.0]  # a rectangle: its box is [10, 5, 50, 40]
    record = {"file_name": str(tmp_path / "b.png"), "image_id": 1, "height": 60, "width": 80,
              "annotations": [{"bbox": np.array([10, 5, 50, 40], np.float32), "category_id": 0, "iscrowd": 0,
                               "segmentation": [poly]}]}
    mapper = DatasetMapper(True, min_size=120, max_size=1000, random_flip="horizontal", mask_on=True)
    outs = {}
    for seed in range(20):  # draw both flip outcomes
        out = mapper(record, np.random.default_rng(seed))
        outs[bool(out["gt_boxes"][0, 0] > 40)] = out  # x0 20, or 160 - 100 = 60 flipped
    assert set(outs) == {False, True}
    plain, flipped = outs[False], outs[True]
    assert plain["gt_masks"].shape == (1, 120, 160) and plain["gt_masks"].dtype.is_floating_point is False
    assert np.array_equal(flipped["gt_masks"][0].numpy(), plain["gt_masks"][0].numpy()[:, ::-1])
    m = plain["gt_masks"][0].numpy()
    want = transform_mask(segmentation_to_mask([poly], 60, 80), (120, 160))
    assert np.array_equal(m, want)
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (20, 10, 100, 80)  # = the resized gt box
    assert plain["gt_boxes"][0].tolist() == [20.0, 10.0, 100.0, 80.0]


def test_synthetic_masks_are_the_visible_pixels() -> None:
    _, annots = render_image(96, 3, np.random.default_rng([0, 1]))
    assert len(annots) >= 2
    union = np.zeros((96, 96), int)
    for a in annots:
        check_segmentation(a["segmentation"], 96, 96, "synth")
        mask = segmentation_to_mask(a["segmentation"], 96, 96)
        assert int(mask.sum()) == a["area"]
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        x, y, w, h = a["bbox"]
        assert (cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) == (x, y, w, h)
        union += mask
    assert union.max() == 1  # visible pixels belong to one shape only


@pytest.mark.slow  # two training iterations of the small R18 Mask R-CNN through the CLI
def test_frcnn_train_with_masks_on_the_synthetic_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch
    from frcnn.runtime.cli import main as frcnn_main
    from frcnn.trainer.data import synthesize_dataset

    synthesize_dataset(tmp_path / "ds", num_images=6, size=128, num_classes=3, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = frcnn_main(["train", "--config", "frcnn-small-R18.yaml", "--data", str(tmp_path / "ds"), "--output",
                         str(tmp_path / "run"), "--log-period", "1", "--no-progress", "MODEL.MASK_ON", "True",
                         "INPUT.MASK_FORMAT", "bitmask", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
                         "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "SOLVER.IMS_PER_BATCH", "2",
                         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                         "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    assert len(lines) == 2 and all(0.3 < r["loss_mask"] < 1.0 for r in lines), lines
    state = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)["model"]
    assert "roi_heads.mask_head.predictor.weight" in state


def _segm_dataset(tmp_path: Path):
    from frcnn.trainer.data.coco import load_coco_json
    from pycocotools import mask as mask_util

    Image.new("RGB", (40, 30)).save(tmp_path / "c.png")
    gt = np.zeros((2, 30, 40), np.uint8)
    gt[0, 2:20, 3:15] = 1
    gt[1, 10:28, 20:38] = 1
    gt[1, 10:16, 20:26] = 0  # not a rectangle: box AP and mask AP differ
    rles = mask_util.encode(np.asfortranarray(gt.transpose(1, 2, 0)))
    anns = []
    for k, rle in enumerate(rles):
        x, y, w, h = mask_util.toBbox(rle).tolist()
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "iscrowd": 0,
                     "area": float(mask_util.area(rle)), "segmentation": {"size": [30, 40],
                                                                           "counts": rle["counts"].decode()}})
    data = {"images": [{"id": 1, "file_name": "c.png", "height": 30, "width": 40}],
            "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    _, meta = load_coco_json(tmp_path / "gt.json", tmp_path)
    return gt.astype(bool), meta


def test_segm_ap_equals_pycocotools_on_the_same_results(tmp_path: Path) -> None:
    import contextlib
    import io

    from frcnn.trainer.evaluation import COCOEvaluator
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, meta = _segm_dataset(tmp_path)
    pred = gt.copy()
    pred[1, 10:16, 20:26] = True  # box right, mask IoU 288 / 324 = 0.89: misses the IoU >= 0.9 thresholds
    boxes = np.array([[3, 2, 15, 20], [20, 10, 38, 28]], np.float32)
    evaluator = COCOEvaluator(meta)
    evaluator.process([{"image_id": 1}], [{"boxes": boxes, "scores": np.array([0.9, 0.8], np.float32),
                                           "classes": np.array([0, 0]), "masks": pred}])
    metrics = evaluator.evaluate()
    assert metrics["AP"] == pytest.approx(1.0)  # boxes are exact
    # Reference: pycocotools directly on RLEs encoded here, without boxes in the results.
    gt_coco = COCO()
    gt_coco.dataset = json.loads((tmp_path / "gt.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco.createIndex()
        rles = mask_util.encode(np.asfortranarray(pred.transpose(1, 2, 0).astype(np.uint8)))
        dt = gt_coco.loadRes([{"image_id": 1, "category_id": 1, "score": s, "segmentation": r}
                              for s, r in zip((0.9, 0.8), rles)])
        ev = COCOeval(gt_coco, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert metrics["segm/AP"] == pytest.approx(ev.stats[0]) and metrics["segm/AP50"] == pytest.approx(1.0)
    assert metrics["segm/AP"] < 0.95 and metrics["segm/AP75"] == pytest.approx(ev.stats[2])


def test_mask_model_without_detections_reports_segm_ap_zero(tmp_path: Path) -> None:
    """Which metrics exist depends on the model, not on whether it found anything: a Mask R-CNN output with no
    detection still gets segm AP (0), a box model's never does (detectron2 picks its tasks from the model)."""
    from frcnn.trainer.evaluation import COCOEvaluator

    _, meta = _segm_dataset(tmp_path)
    empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
             "classes": np.zeros(0, np.int64)}  # fmt: skip
    for masks, has_segm in ((np.zeros((0, 30, 40), bool), True), (None, False)):
        evaluator = COCOEvaluator(meta)
        evaluator.process([{"image_id": 1}], [{**empty, "masks": masks}])
        metrics = evaluator.evaluate()
        assert metrics["AP"] == 0.0 and ("segm/AP" in metrics) == has_segm
        if has_segm:
            assert metrics["segm/AP"] == 0.0 and metrics["segm/AP50"] == 0.0
