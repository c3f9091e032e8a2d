"""COCO loading + validation, the dataset mapper's transforms, and the train / test loaders."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from frcnn.runtime.errors import UserError
from frcnn.trainer.data import (
    DatasetMapper,
    DatasetWarning,
    build_test_loader,
    build_train_loader,
    filter_images_without_annotations,
    load_coco_json,
    read_image,
)
from PIL import Image

CATEGORIES = [{"id": 11, "name": "kite"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def _write_dataset(
    root: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] = CATEGORIES,
    make_files: bool = True,
) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    if make_files:
        rng = np.random.default_rng(0)
        for img in images:
            pixels = rng.integers(0, 256, size=(img["height"], img["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "imgs" / img["file_name"])
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _img(i: int, w: int = 40, h: int = 20) -> dict[str, Any]:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i: int, image_id: int, bbox: list[float], cat: int = 3, crowd: int = 0) -> dict[str, Any]:
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": cat, "iscrowd": crowd}


# ------------------------------------------------------------------------------------------------ loading


def test_load_maps_categories_converts_boxes_and_keeps_crowd(tmp_path: Path) -> None:
    path = _write_dataset(
        tmp_path,
        [_img(5), _img(6), _img(9)],
        [
            _ann(1, 5, [1.5, 2.0, 10.25, 4.0], cat=11),
            _ann(2, 5, [0, 0, 5, 5], cat=3, crowd=1),
            _ann(3, 6, [3, 4, 2, 2], cat=7),
            _ann(4, 6, [0.1, 0.2, 0.3, 0.4], cat=3),
        ],
    )
    dicts, meta = load_coco_json(path, tmp_path / "imgs")
    # contiguous ids follow the sorted COCO ids: 3 -> 0 (cat), 7 -> 1 (dog), 11 -> 2 (kite)
    assert meta.thing_classes == ("cat", "dog", "kite")
    assert meta.thing_dataset_ids == (3, 7, 11)
    assert [meta.to_dataset_id(meta.to_contiguous(c)) for c in (3, 7, 11)] == [3, 7, 11]
    assert [meta.to_contiguous(meta.to_dataset_id(i)) for i in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        meta.to_contiguous(4)
    assert [d["image_id"] for d in dicts] == [5, 6, 9]
    d0 = dicts[0]
    assert d0["file_name"] == str(tmp_path / "imgs" / "5.png") and (d0["height"], d0["width"]) == (20, 40)
    a, crowd = d0["annotations"]
    assert a["bbox"].dtype == np.float32
    np.testing.assert_array_equal(a["bbox"], np.array([1.5, 2.0, 11.75, 6.0], np.float32))
    assert (a["category_id"], a["iscrowd"]) == (2, 0)
    assert (crowd["category_id"], crowd["iscrowd"]) == (0, 1)
    # x2 = x + w rounded to float32 (detectron2 BoxMode.convert on a list)
    expected = np.float32(0.1) + np.float32(0.3)
    assert dicts[1]["annotations"][1]["bbox"][2] == expected
    assert dicts[2]["annotations"] == []  # kept for evaluation
    assert (meta.stats.images, meta.stats.annotations, meta.stats.crowd) == (3, 4, 1)
    assert meta.stats.images_without_annotations == 1


def test_filter_empty_drops_unannotated_and_crowd_only_images(tmp_path: Path) -> None:
    path = _write_dataset(
        tmp_path, [_img(1), _img(2), _img(3)], [_ann(1, 1, [0, 0, 5, 5], crowd=1), _ann(2, 2, [0, 0, 5, 5])]
    )
    dicts, _ = load_coco_json(path, tmp_path / "imgs")
    with pytest.warns(DatasetWarning, match="2 of 3 images"):
        kept = filter_images_without_annotations(dicts)
    assert [d["image_id"] for d in kept] == [2]
    with pytest.raises(UserError, match="nothing to train on"), pytest.warns(DatasetWarning):
        filter_images_without_annotations(dicts[:1])


def test_missing_image_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path, [_img(1), _img(2)], [])
    (tmp_path / "imgs" / "2.png").unlink()
    with pytest.raises(UserError, match=r"1 of 2 image files .* missing: .*2\.png"):
        load_coco_json(path, tmp_path / "imgs")
    dicts, _ = load_coco_json(path, tmp_path / "imgs", check_files=False)
    with pytest.raises(UserError, match=r"2\.png does not exist"):  # and again when the mapper reads it
        read_image(dicts[1]["file_name"])


def test_malformed_json_says_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,\n   "file_name": "a.png" "width": 3}\n]}')
    with pytest.raises(
        UserError, match=r"bad\.json is not valid JSON: Expecting ',' delimiter at line 3, column 25"
    ):
        load_coco_json(path, tmp_path)
    path.write_text('{"images": [], "categories": []}')
    with pytest.raises(UserError, match="'categories' must be a non-empty list"):
        load_coco_json(path, tmp_path)
    path = _write_dataset(tmp_path, [_img(1)], [_ann(7, 1, [1, 2, 3])], make_files=False)
    with pytest.raises(UserError, match=r"annotations\[0\] \(id 7\): 'bbox' must be 4 numbers"):
        load_coco_json(path, tmp_path / "imgs", check_files=False)
    path = _write_dataset(tmp_path, [_img(1)], [_ann(7, 99, [1, 2, 3, 4])], make_files=False)
    with pytest.raises(UserError, match="image_id=99 is not in 'images'"):
        load_coco_json(path, tmp_path / "imgs", check_files=False)


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path: Path) -> None:
    path = _write_dataset(
        tmp_path,
        [_img(1)],
        [_ann(1, 1, [-3, 2, 10, 4]), _ann(2, 1, [30, 15, 20, 20]), _ann(3, 1, [5, 5, 5, 5])],
        make_files=False,
    )
    with pytest.warns(DatasetWarning, match="2 boxes reaching outside their image were clipped"):
        dicts, meta = load_coco_json(path, tmp_path / "imgs", check_files=False)
    boxes = [a["bbox"].tolist() for a in dicts[0]["annotations"]]
    assert boxes == [[0, 2, 7, 6], [30, 15, 40, 20], [5, 5, 10, 10]]
    assert (meta.stats.clipped_boxes, meta.stats.dropped_degenerate) == (2, 0)


def test_degenerate_boxes_are_dropped_and_counted(tmp_path: Path) -> None:
    anns = [
        _ann(1, 1, [1, 1, 0, 5]),
        _ann(2, 1, [1, 1, 5, -2]),
        _ann(3, 1, [50, 1, 5, 5]),
        _ann(4, 1, [1, 1, 2, 2]),
    ]
    path = _write_dataset(tmp_path, [_img(1)], anns, make_files=False)
    with pytest.warns(DatasetWarning, match="3 boxes with zero or negative width/height were dropped"):
        dicts, meta = load_coco_json(path, tmp_path / "imgs", check_files=False)
    assert len(dicts[0]["annotations"]) == 1
    assert (meta.stats.dropped_degenerate, meta.stats.clipped_boxes) == (3, 1)  # #3 lies right of the image


def test_unknown_category_names_image_and_id(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path, [_img(1)], [_ann(1, 1, [1, 1, 2, 2], cat=4)], make_files=False)
    with pytest.raises(
        UserError, match=r"image '.*1\.png'\): category_id=4 is not one of the ids .*\[3, 7, 11\]"
    ):
        load_coco_json(path, tmp_path / "imgs", check_files=False)


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path, [], [])
    with pytest.raises(UserError, match="dataset is empty"):
        load_coco_json(path, tmp_path / "imgs")
    with pytest.raises(UserError, match="does not exist"):
        load_coco_json(tmp_path / "nope.json", tmp_path)


# ------------------------------------------------------------------------------------------------- mapper


class _FixedRng:
    """Stands in for numpy's Generator: size index ``pick``, flip coin ``coin`` (< 0.5 flips)."""

    def __init__(self, pick: int, coin: float) -> None:
        self.pick, self.coin = pick, coin

    def integers(self, *args: Any, **kwargs: Any) -> int:
        return self.pick

    def random(self) -> float:
        return self.coin


def _mapper_record(tmp_path: Path) -> tuple[dict[str, Any], np.ndarray]:
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    anns = [
        {"bbox": np.array([4, 2, 12, 10], np.float32), "category_id": 2, "iscrowd": 0},
        {"bbox": np.array([0, 0, 8, 8], np.float32), "category_id": 1, "iscrowd": 1},
        {"bbox": np.array([5, 5, 5.000001, 8], np.float32), "category_id": 0, "iscrowd": 0},
        {"bbox": np.array([30, 0, 40, 20], np.float32), "category_id": 0, "iscrowd": 0},
    ]
    record = {
        "file_name": str(tmp_path / "m.png"),
        "height": 20,
        "width": 40,
        "image_id": 3,
        "annotations": anns,
    }
    return record, rgb


def test_mapper_resize_and_flip_move_boxes_with_the_image(tmp_path: Path) -> None:
    record, rgb = _mapper_record(tmp_path)
    mapper = DatasetMapper(True, min_size=(12, 10), max_size=1000, random_flip="horizontal")
    out = mapper(record, _FixedRng(pick=1, coin=0.2))  # short edge 10 -> scale 0.5 -> 10 x 20; flipped
    assert out["image_size"] == (10, 20) and (out["height"], out["width"]) == (20, 40)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 10, 20)
    # by hand: [4, 2, 12, 10] * 0.5 = [2, 1, 6, 5]; flip in width 20: x -> 20 - x = [14, 1, 18, 5];
    # [30, 0, 40, 20] * 0.5 = [15, 0, 20, 10] -> [0, 0, 5, 10]; crowd dropped; the 1e-6 wide box -> 5e-7 dropped
    assert out["gt_boxes"].dtype == torch.float32 and out["gt_classes"].dtype == torch.int64
    assert out["gt_boxes"].tolist() == [[14, 1, 18, 5], [0, 0, 5, 10]]
    assert out["gt_classes"].tolist() == [2, 0]
    ref = np.asarray(Image.fromarray(rgb).resize((20, 10), Image.Resampling.BILINEAR))[:, ::-1, ::-1]
    np.testing.assert_array_equal(out["image"].numpy(), ref.transpose(2, 0, 1))
    # no flip when the coin says so; max_size caps the long side: short 12 -> 12 x 24 > 18 -> 9 x 18
    capped = DatasetMapper(True, min_size=(12,), max_size=18)(record, _FixedRng(pick=0, coin=0.7))
    assert capped["image_size"] == (9, 18)
    # x * 18 / 40 = 0.45 x, y * 9 / 20 = 0.45 y
    np.testing.assert_allclose(capped["gt_boxes"][0].numpy(), [1.8, 0.9, 5.4, 4.5], rtol=1e-6)


def test_mapper_test_mode_and_vertical_flip(tmp_path: Path) -> None:
    record, _ = _mapper_record(tmp_path)
    out = DatasetMapper(False, min_size=10, max_size=1000)(record)
    assert out["image_size"] == (10, 20) and "gt_boxes" not in out
    vflip = DatasetMapper(True, min_size=(20,), max_size=1000, random_flip="vertical")(
        record, _FixedRng(0, 0.0)
    )
    assert vflip["gt_boxes"][0].tolist() == [4, 10, 12, 18]  # y -> 20 - y
    with pytest.raises(UserError, match="RANDOM_FLIP"):
        DatasetMapper(True, min_size=(20,), max_size=100, random_flip="diagonal")


def test_read_image_is_bgr_with_exif_orientation(tmp_path: Path) -> None:
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # red top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "e.png", exif=exif)
    img = read_image(str(tmp_path / "e.png"))
    assert img.shape == (4, 2, 3)  # transposed by the orientation tag
    assert img[0, 1].tolist() == [0, 0, 255]  # red in BGR, now at the top-right
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        read_image(str(tmp_path / "junk.png"))


def test_mapper_rejects_size_mismatch(tmp_path: Path) -> None:
    record, _ = _mapper_record(tmp_path)
    with pytest.raises(UserError, match="is 40x20 .* dataset says 41x20"):
        DatasetMapper(False, min_size=10, max_size=100)({**record, "width": 41})


# ------------------------------------------------------------------------------------------------ loaders


def _cfg(ims_per_batch: int = 2, workers: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        SEED=7,
        MODEL=SimpleNamespace(MASK_ON=False),
        SOLVER=SimpleNamespace(IMS_PER_BATCH=ims_per_batch),
        DATALOADER=SimpleNamespace(
            NUM_WORKERS=workers, ASPECT_RATIO_GROUPING=True, FILTER_EMPTY_ANNOTATIONS=True
        ),
        INPUT=SimpleNamespace(
            MIN_SIZE_TRAIN=(16, 20),
            MAX_SIZE_TRAIN=40,
            MIN_SIZE_TRAIN_SAMPLING="choice",
            MIN_SIZE_TEST=16,
            MAX_SIZE_TEST=40,
            RANDOM_FLIP="horizontal",
            FORMAT="BGR",
        ),
    )


def _fake_dicts(n: int) -> list[dict[str, Any]]:
    # alternate orientation, with one square image (grouped with portrait images, like detectron2)
    sizes = [(20, 40) if i % 3 == 0 else (40, 20) if i % 3 == 1 else (30, 30) for i in range(n)]
    return [
        {
            "image_id": i,
            "height": h,
            "width": w,
            "file_name": f"{i}.png",
            "annotations": [{"bbox": np.zeros(4, np.float32), "category_id": 0, "iscrowd": 0}],
        }
        for i, (h, w) in enumerate(sizes)
    ]


def _id_mapper(d: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {
        "image_id": d["image_id"],
        "height": d["height"],
        "width": d["width"],
        "draw": float(rng.random()),
    }


def test_aspect_grouping_yields_single_orientation_batches() -> None:
    batches = list(itertools.islice(build_train_loader(_cfg(3), _fake_dicts(12), mapper=_id_mapper), 10))
    assert all(len(b) == 3 for b in batches)
    kinds = [{d["width"] > d["height"] for d in b} for b in batches]
    assert all(len(k) == 1 for k in kinds)
    assert {True} in kinds and {False} in kinds


def test_two_ranks_see_disjoint_images_and_the_stream_is_seeded() -> None:
    dicts = _fake_dicts(10)

    def ids(rank: int, seed: int = 7) -> list[int]:
        loader = build_train_loader(
            _cfg(4), dicts, mapper=_id_mapper, rank=rank, world_size=2, aspect_ratio_grouping=False, seed=seed
        )
        return [d["image_id"] for b in itertools.islice(loader, 5) for d in b]  # 5 batches of 2 = 2 epochs

    r0, r1 = ids(0), ids(1)
    assert set(r0[:5]).isdisjoint(r1[:5]) and set(r0[:5]) | set(r1[:5]) == set(range(10))  # epoch 1
    assert set(r0[5:]).isdisjoint(r1[5:]) and set(r0[5:]) | set(r1[5:]) == set(range(10))  # epoch 2
    assert ids(0) == r0 and ids(0, seed=8) != r0


def test_workers_give_the_same_batches_as_the_main_process(tmp_path: Path) -> None:
    images = [_img(i, 40, 20) if i % 2 else _img(i, 20, 40) for i in range(1, 7)]
    path = _write_dataset(tmp_path, images, [_ann(i, i, [2, 2, 8, 6], cat=7) for i in range(1, 7)])
    dicts, _ = load_coco_json(path, tmp_path / "imgs")

    def run(workers: int) -> list[list[tuple[int, tuple[int, int], list[float]]]]:
        loader = build_train_loader(_cfg(2, workers), dicts)
        return [
            [(d["image_id"], d["image_size"], d["gt_boxes"].flatten().tolist()) for d in b]
            for b in itertools.islice(loader, 6)
        ]

    main, workers = run(0), run(2)
    assert main == workers
    assert len({s for b in main for _, s, _ in b}) > 2  # several sampled sizes / orientations
    assert len({tuple(box) for b in main for _, _, box in b}) > 2  # flips happened too


def test_test_loader_is_ordered_and_sharded(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path, [_img(i) for i in range(1, 6)], [])
    dicts, _ = load_coco_json(path, tmp_path / "imgs")
    batches = list(build_test_loader(_cfg(), dicts, batch_size=2))
    assert [[d["image_id"] for d in b] for b in batches] == [[1, 2], [3, 4], [5]]
    assert batches[0][0]["image"].shape == (3, 16, 32) and batches[0][0]["image_size"] == (16, 32)
    shards = [
        [d["image_id"] for b in build_test_loader(_cfg(), dicts, rank=r, world_size=2) for d in b]
        for r in (0, 1)
    ]
    assert shards == [[1, 2, 3], [4, 5]]


def test_mapper_from_the_project_config() -> None:
    from frcnn.trainer.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(640, 800)", "INPUT.MAX_SIZE_TRAIN", "1000"])
    train, test = DatasetMapper.from_config(cfg, True), DatasetMapper.from_config(cfg, False)
    assert (train.min_size, train.max_size, train.random_flip, train.is_train) == (
        (640, 800),
        1000,
        "horizontal",
        True,
    )
    assert (test.min_size, test.max_size, test.random_flip, test.is_train) == ((800,), 1333, "none", False)
