"""Mask R-CNN training loss: detectron2's mask targets (BitMasks.crop_and_resize) and mask_rcnn_loss.

References: a per-sample pure-Python ROIAlign (aligned=True, adaptive sampling, torchvision/detectron2's
bilinear border rules) for the targets; the BCE-with-logits formula in NumPy for the loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from frcnn.trainer.modeling.mask_losses import mask_crop_and_resize, mask_rcnn_loss, mask_targets_and_losses
from frcnn.trainer.modeling.roi_losses import label_and_sample_proposals
from model_utils import lively_model, random_images


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[y0, x0] + (1 - ly) * lx * img[y0, x1] + ly * (1 - lx) * img[y1, x0]
            + ly * lx * img[y1, x1])


def _reference_target(mask: np.ndarray, box, size: int) -> np.ndarray:
    """ROIAlign(size, spatial_scale 1, sampling_ratio 0, aligned=True) of a float mask, then >= 0.5."""
    x1, y1, x2, y2 = (float(np.float32(v)) for v in box)
    sx, sy = x1 - 0.5, y1 - 0.5
    bw, bh = (x2 - x1) / size, (y2 - y1) / size
    gx, gy = math.ceil((x2 - x1) / size), math.ceil((y2 - y1) / size)
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            acc = 0.0
            for a in range(gy):
                for b in range(gx):
                    acc += _bilinear(mask, sy + i * bh + (a + 0.5) * bh / gy, sx + j * bw + (b + 0.5) * bw / gx)
            out[i, j] = acc / max(gx * gy, 1)
    return out


def test_mask_targets_equal_roialign_reference() -> None:
    masks = np.zeros((3, 40, 56), np.float32)
    masks[0, 5:30, 8:40] = 1  # a rectangle
    yy, xx = np.mgrid[0:40, 0:56]
    masks[1] = ((yy - 22) ** 2 + (xx - 30) ** 2 < 15**2)  # a disc
    masks[2, 30:, :20] = 1  # touching the image border
    gt_index = torch.tensor([1, 0, 2, 1, 0])
    boxes = torch.tensor([[14.2, 6.7, 46.1, 37.3],  # around the disc
                          [8.0, 5.0, 40.0, 30.0],  # exactly the rectangle
                          [-3.5, 26.0, 24.4, 44.0],  # partly outside the image
                          [29.0, 21.0, 31.5, 23.2],  # tiny, inside the disc
                          [30.0, 10.0, 60.0, 36.0]], dtype=torch.float32)  # half on the rectangle
    got = mask_crop_and_resize(torch.from_numpy(masks).bool(), gt_index, boxes, 28)
    assert got.shape == (5, 28, 28) and got.dtype == torch.bool
    for n in range(5):
        ref = _reference_target(masks[int(gt_index[n])], boxes[n].tolist(), 28)
        decided = np.abs(ref - 0.5) > 1e-4
        assert np.array_equal(got[n].numpy()[decided], ref[decided] >= 0.5), n
        assert (~decided).sum() <= 4
    assert got[1].all() and got[3].all()  # the box of the rectangle itself; a box inside the disc
    assert 0.2 < got[4].float().mean() < 0.5 and got[0].float().mean() > 0.5


def test_mask_rcnn_loss_is_bce_of_the_gt_class_channel() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 6, 6) * 3
    classes = torch.tensor([2, 0, 1, 2])
    targets = torch.rand(4, 6, 6) > 0.5
    x = logits.numpy()[np.arange(4), classes.numpy()].astype(np.float64)
    t = targets.numpy().astype(np.float64)
    want = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
    assert float(mask_rcnn_loss(logits, classes, targets)) == pytest.approx(want, rel=1e-6)
    x0 = logits.numpy()[:, 0].astype(np.float64)  # class-agnostic: channel 0
    want0 = np.mean(np.maximum(x0, 0) - x0 * t + np.log1p(np.exp(-np.abs(x0))))
    assert float(mask_rcnn_loss(logits[:, :1], classes, targets)) == pytest.approx(want0, rel=1e-6)
    empty = torch.zeros(0, 3, 6, 6, requires_grad=True)
    loss = mask_rcnn_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 6, 6, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def _training_batch():
    (img,) = random_images([(128, 160)], 4)
    images = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    masks = torch.zeros(2, 128, 160, dtype=torch.bool)
    masks[0, 20:70, 30:90] = True
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(160), indexing="ij")
    masks[1] = (yy - 90) ** 2 + (xx - 110) ** 2 < 25**2
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0], [85.0, 65.0, 135.0, 115.0]]),
                "classes": torch.tensor([0, 2]), "masks": masks}]
    return images, torch.tensor([[128, 160]], dtype=torch.int32), targets


@pytest.mark.slow  # ~15 s of CPU: one R18 training step + 12 mask-head steps
def test_model_training_has_a_mask_loss_that_falls() -> None:
    _, model = lively_model("frcnn-small-R18.yaml", "MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32")
    images, sizes, targets = _training_batch()
    model.train()
    torch.manual_seed(0)
    losses = model(images, sizes, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert 0.5 < float(losses["loss_mask"]) < 0.8  # ~log 2 at detectron2's init (predictor std 0.001)
    losses["loss_mask"].backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    # A few steps of the mask head alone on fixed features and samples: the loss falls.
    heads = model.roi_heads
    with torch.no_grad():
        features = model.backbone(model.preprocess(images, sizes))
        proposals, num, _ = model.proposal_generator.eval()(features, sizes)
        samples = label_and_sample_proposals(heads.sampling, heads.num_classes, proposals, num, targets)
    optim = torch.optim.Adam(heads.mask_head.parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        optim.zero_grad()
        loss = mask_targets_and_losses(heads, features, samples, targets)["loss_mask"]
        loss.backward()
        optim.step()
        history.append(float(loss))
    assert np.mean(history[-3:]) < 0.85 * history[0], history


def test_mask_training_needs_masks_of_every_box() -> None:
    _, model = lively_model("frcnn-small-R18.yaml", "MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32")
    images, sizes, targets = _training_batch()
    model.train()
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] must be \[G, H, W\] with G = 2 boxes"):
        model(images, sizes, [dict(targets[0], masks=targets[0]["masks"][:1])])
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'masks'"):
        model(images, sizes, [{k: v for k, v in targets[0].items() if k != "masks"}])
