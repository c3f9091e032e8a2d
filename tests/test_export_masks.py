"""Mask R-CNN export: the ONNX gains ``masks`` [B, T, 28, 28]; ONNX Runtime matches PyTorch on other sizes.

The model is the parity model of tests/export_utils.py (well-separated detections) with a mask head added
(MODEL.MASK_ON, narrow CONV_DIM for speed, predictor widened so probabilities spread around 0.5). Exported
at 320x320, run through the runtime Detector (ONNX Runtime, CPU) on batches of 1 and 3 images of other
sizes. Every detection is matched (same class, IoU >= 0.999, |dscore| <= 1e-4); its raw 28x28 probabilities
agree within 1e-4 and its pasted mask (original image) has IoU >= 0.99 with PyTorch's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_utils import parity_model, textured
from frcnn.export.onnx_export import OUTPUT_NAMES, export_onnx
from frcnn.export.polygraphy_runners import box_iou
from frcnn.plugins import DOMAIN
from frcnn.runtime import Detector
from frcnn.trainer.checkpoint import load_into_model
from frcnn.trainer.modeling import build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # one dynamo export (~50 s of CPU), run by default


@functools.lru_cache(maxsize=1)
def mask_model() -> tuple[object, torch.nn.Module]:
    box_cfg, box_model = parity_model()
    cfg = box_cfg.clone()
    cfg.merge_from_list(["MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32"])
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    report = load_into_model(model, box_model.state_dict(), strict=False)
    assert report.missing and all(k.startswith("roi_heads.mask_head.") for k in report.missing)
    with torch.no_grad():
        model.roi_heads.mask_head.predictor.weight.normal_(std=0.3)
    return cfg, model


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg, model = mask_model()
    folder = tmp_path_factory.mktemp("mask-export")
    return export_onnx(model, cfg, folder / "mask.onnx", example_hw=(320, 320), max_batch=4, max_side=640)


@pytest.fixture(scope="module")
def detector(onnx_path: Path):
    with Detector(onnx_path, providers=["cpu"], intra_op_threads=1) as det:
        yield det


def test_mask_export_adds_the_masks_output_and_a_second_pooler(onnx_path: Path) -> None:
    model = onnx.load(str(onnx_path))
    outputs = [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in model.graph.output]
    assert [n for n, _ in outputs] == [*OUTPUT_NAMES, "masks"]
    assert outputs[-1][1] == ["batch", 100, 28, 28]
    assert model.graph.output[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    pools = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.domain == DOMAIN and n.op_type == "ROIAlignV2"}
    assert sorted(pools) == ["roi_heads/box_pooler/ROIAlignV2", "roi_heads/mask_pooler/ROIAlignV2"]
    mask_pool = pools["roi_heads/mask_pooler/ROIAlignV2"]
    assert (mask_pool["output_size"], mask_pool["sampling_ratio"], mask_pool["aligned"]) == (14, 0, 1)
    assert sorted(f.name for f in model.functions) == ["BatchedNMS", "ROIAlignV2"]  # no new op
    assert any(i.name == "roi_heads.mask_head.predictor.weight" for i in model.graph.initializer)


CASES = {
    "batch1_256x384": lambda: textured([(256, 384)], 21),
    "batch3_mixed": lambda: textured([(416, 288), (256, 384), (300, 260)], 22),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ort_masks_match_pytorch(detector, case: str) -> None:
    images = CASES[case]()
    feed, original_sizes = detector.preprocess(images)
    ort_out = detector.backend.infer(feed)
    _, model = mask_model()
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(torch.from_numpy(feed["images"]),
                                                torch.from_numpy(feed["image_sizes"])).items()}
    assert ort_out["masks"].shape == ref["masks"].shape == (len(images), 100, 28, 28)
    ort_dets = detector.postprocess(ort_out, feed["image_sizes"], original_sizes)
    ref_dets = detector.postprocess(ref, feed["image_sizes"], original_sizes)
    matched, worst_prob, worst_iou = 0, 0.0, 1.0
    for i in range(len(images)):
        n = int(ref["num_detections"][i])
        assert n > 3 and int(ort_out["num_detections"][i]) == n
        iou = box_iou(ort_out["boxes"][i, :n], ref["boxes"][i, :n])
        for j in range(n):
            same = (ort_out["classes"][i, j] == ref["classes"][i, :n]) & (iou[j] >= 0.999)
            same &= np.abs(ort_out["scores"][i, j] - ref["scores"][i, :n]) <= 1e-4
            (k,) = np.flatnonzero(same)[:1]
            worst_prob = max(worst_prob, float(np.abs(ort_out["masks"][i, j] - ref["masks"][i, k]).max()))
            matched += 1
        a, b = ort_dets[i], ref_dets[i]
        assert a.masks is not None and a.masks.shape == (len(a), *images[i].shape[:2])
        pair = box_iou(a.boxes, b.boxes)
        for j in range(len(a)):
            k = int(np.argmax(pair[j]))
            union = (a.masks[j] | b.masks[k]).sum()
            worst_iou = min(worst_iou, (a.masks[j] & b.masks[k]).sum() / union if union else 1.0)
        assert sum(int(m.sum()) for m in a.masks) > 100  # the masks are not empty
    print(f"{case}: {matched} detections, max |dprob| {worst_prob:.2e}, min pasted-mask IoU {worst_iou:.4f}")
    assert worst_prob <= 1e-4 and worst_iou >= 0.99
    assert matched == int(ref["num_detections"].sum())
    spread = ref["masks"][0, : int(ref["num_detections"][0])]
    assert ((spread > 0.6).mean() > 0.05) and ((spread < 0.4).mean() > 0.05)  # a meaningful threshold test


def test_deployed_segm_ap_equals_pytorch(onnx_path: Path, tmp_path: Path) -> None:
    from frcnn.trainer.data import load_coco_split, synthesize_dataset
    from frcnn.trainer.engine.inference import evaluate_model
    from frcnn.trainer.eval_deployed import evaluate_deployed, format_delta

    synthesize_dataset(tmp_path / "ds", num_images=8, size=128, num_classes=3, seed=1, val_fraction=0.5)
    cfg, model = mask_model()
    dicts, meta = load_coco_split(tmp_path / "ds", "val")
    with torch.inference_mode():
        reference = evaluate_model(model, cfg, dicts, meta, num_workers=0)
    deployed = evaluate_deployed(str(onnx_path), str(tmp_path / "ds"), "val", None, 2)
    print(format_delta(deployed, reference))
    for key in ("AP", "AP50", "segm/AP", "segm/AP50"):
        assert key in deployed and abs(deployed[key] - reference[key]) <= 1e-3, (key, deployed[key], reference[key])
    assert "segm/AP-circle" in deployed or any(k.startswith("segm/AP-") for k in deployed)


def test_parity_cli_compares_masks(onnx_path: Path, tmp_path: Path) -> None:
    """`frcnn parity` on a Mask R-CNN export: a "masks" row (raw probabilities and pasted-mask IoU of every
    matched detection) that passes; the same check on a model whose mask predictor was changed fails."""
    import subprocess
    import sys

    from frcnn.trainer.checkpoint import save_checkpoint
    from PIL import Image

    cfg, model = mask_model()
    (tmp_path / "config.yaml").write_text(cfg.dump())
    save_checkpoint(tmp_path / "model.pth", model, cfg=cfg.dump(), iteration=0)
    images = tmp_path / "images"
    images.mkdir()
    for k, img in enumerate(textured([(416, 288), (256, 384)], 22)):
        Image.fromarray(img).save(images / f"{k}.png")

    def parity(weights: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "frcnn.runtime.cli", "parity", str(weights), str(onnx_path),
                               "--images", str(images), "--config", str(tmp_path / "config.yaml")],
                              check=False, capture_output=True, text=True, timeout=300)

    good = parity(tmp_path / "model.pth")
    assert good.returncode == 0, good.stdout + good.stderr
    rows = [line for line in good.stdout.splitlines() if " masks " in line]
    assert len(rows) == 2 and all(r.rstrip().endswith("PASS") for r in rows), good.stdout
    assert all(int(r.split("masks", 1)[1].split()[0]) > 3 for r in rows), rows  # "N compared", N detections
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    changed["roi_heads.mask_head.predictor.bias"] += 0.5  # every probability moves; boxes do not
    save_checkpoint(tmp_path / "changed.pth", changed, cfg=cfg.dump(), iteration=0)
    bad = parity(tmp_path / "changed.pth")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "PARITY FAILED" in bad.stdout and "mask of detection" in bad.stdout
    assert all(line.rstrip().endswith("PASS") for line in bad.stdout.splitlines() if " detections " in line)
