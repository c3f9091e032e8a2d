"""ResNet + FPN backbone: detectron2 keys/shapes, strides, freezing, FrozenBN, STRIDE_IN_1X1, FPN top-down."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from frcnn.runtime.errors import ConfigError
from frcnn.trainer.config import get_cfg, model_zoo_config
from frcnn.trainer.modeling.fpn import FPN, LastLevelMaxPool, build_backbone, build_resnet_fpn_backbone
from frcnn.trainer.modeling.layers import Backbone, FrozenBatchNorm2d, ShapeSpec
from frcnn.trainer.modeling.resnet import BasicBlock, BottleneckBlock, build_resnet_backbone
from torch import Tensor

torch.set_num_threads(1)
IMAGE = ShapeSpec(channels=3)


def _r50_cfg():
    """detectron2's faster_rcnn_R_50_FPN_3x config (get_cfg() defaults alone describe a C4 model)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    return cfg


@pytest.fixture(scope="module")
def r50_fpn() -> FPN:
    torch.manual_seed(0)
    return build_backbone(_r50_cfg()).eval()


def test_r50_fpn_state_dict_equals_detectron2(r50_fpn: FPN, d2_key_shapes: dict[str, tuple[int, ...]]) -> None:
    expected = [
        row for row in d2_key_shapes.items() if row[0].startswith("backbone.")
    ]
    got = [("backbone." + k, tuple(v.shape)) for k, v in r50_fpn.state_dict().items()]
    assert len(expected) == 281
    assert dict(got) == dict(expected)
    assert got == expected  # same order as detectron2 too


def test_r50_fpn_output_shapes_and_strides(r50_fpn: FPN) -> None:
    assert r50_fpn.size_divisibility == 32
    spec = r50_fpn.output_shape()
    assert list(spec) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in spec.values()] == [4, 8, 16, 32, 64]
    assert all(s.channels == 256 for s in spec.values())
    bottom = r50_fpn.bottom_up.output_shape()
    assert {k: (s.channels, s.stride) for k, s in bottom.items()} == {
        "res2": (256, 4),
        "res3": (512, 8),
        "res4": (1024, 16),
        "res5": (2048, 32),
    }
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = r50_fpn(x)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, t in out.items():
        s = spec[name].stride
        assert t.shape == (2, 256, math.ceil(64 / s), math.ceil(96 / s)), name
    with torch.no_grad():
        res = r50_fpn.bottom_up(x)
    assert {k: tuple(v.shape) for k, v in res.items()} == {
        "res2": (2, 256, 16, 24),
        "res3": (2, 512, 8, 12),
        "res4": (2, 1024, 4, 6),
        "res5": (2, 2048, 2, 3),
    }


@pytest.mark.parametrize(
    "depth,blocks,block_class,res5_channels",
    [
        (18, [2, 2, 2, 2], BasicBlock, 512),
        (34, [3, 4, 6, 3], BasicBlock, 512),
        (101, [3, 4, 23, 3], BottleneckBlock, 2048),
    ],
)
def test_depths_build_expected_stages(
    depth: int, blocks: list[int], block_class: type, res5_channels: int
) -> None:
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    resnet = build_resnet_backbone(cfg, IMAGE)
    stages = [getattr(resnet, f"res{i}") for i in range(2, 6)]
    assert [len(s) for s in stages] == blocks
    assert all(isinstance(b, block_class) for s in stages for b in s)
    assert resnet.output_shape()["res5"] == ShapeSpec(channels=res5_channels, stride=32)
    # The first block of res3..res5 has a projection shortcut with stride 2; later blocks are identity.
    for stage in stages[1:]:
        assert stage[0].shortcut is not None and stage[0].shortcut.stride == (2, 2)
        assert all(b.shortcut is None for b in stage[1:])
    if depth == 18:  # BasicBlock in res2 keeps 64 channels: no shortcut (detectron2 keys res2.0.conv1 only)
        assert stages[0][0].shortcut is None


def test_depth_18_forward_shapes() -> None:
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    with torch.no_grad():
        out = build_backbone(cfg).eval()(torch.randn(1, 3, 96, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 32, 24, 16),
        "p3": (1, 32, 12, 8),
        "p4": (1, 32, 6, 4),
        "p5": (1, 32, 3, 2),
        "p6": (1, 32, 2, 1),
    }


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at: int) -> None:
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    resnet = build_resnet_backbone(cfg, IMAGE)
    parts = {"stem": 1, "res2": 2, "res3": 3, "res4": 4, "res5": 5}
    for name, index in parts.items():
        params = list(getattr(resnet, name).parameters())
        assert params
        frozen = freeze_at >= index
        assert all(p.requires_grad is not frozen for p in params), (name, freeze_at)


def test_freeze_converts_batchnorm_to_frozen() -> None:
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    resnet = build_resnet_backbone(cfg, IMAGE)
    assert isinstance(resnet.stem.conv1.norm, FrozenBatchNorm2d)
    assert isinstance(resnet.res2[1].conv2.norm, FrozenBatchNorm2d)
    assert isinstance(resnet.res3[0].conv1.norm, torch.nn.BatchNorm2d)
    assert resnet.res3[0].conv1.norm.weight.requires_grad


def test_frozen_batchnorm_matches_numpy_formula() -> None:
    rng = np.random.default_rng(0)
    c = 5
    w, b, mean = rng.normal(size=c), rng.normal(size=c), rng.normal(size=c)
    var = rng.uniform(0.0, 3.0, size=c)
    var[0] = 0.0  # eps keeps it finite
    x = rng.normal(size=(2, c, 3, 4)).astype(np.float32)
    bn = FrozenBatchNorm2d(c)
    assert bn.eps == 1e-5
    assert sorted(bn.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert list(bn.parameters()) == []
    with torch.no_grad():  # a fresh FrozenBN is the identity
        assert torch.allclose(bn(torch.from_numpy(x)), torch.from_numpy(x), atol=1e-6)
    for name, value in [("weight", w), ("bias", b), ("running_mean", mean), ("running_var", var)]:
        getattr(bn, name).copy_(torch.from_numpy(value))
    expected = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) * w[
        None, :, None, None
    ] + b[None, :, None, None]
    got = bn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    half = bn(torch.from_numpy(x).half())
    assert half.dtype == torch.float16


def test_frozen_batchnorm_load_versions() -> None:
    bn = FrozenBatchNorm2d(3)
    weight = torch.tensor([1.0, 2.0, 3.0])
    # Caffe2 model-zoo pickles: no version metadata and no running statistics -> identity statistics.
    bn.load_state_dict({"weight": weight, "bias": torch.zeros(3)}, strict=True)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    # Version 2 stored running_var with eps included; loading subtracts it (detectron2's upgrade).
    sd = {
        "weight": weight,
        "bias": torch.zeros(3),
        "running_mean": torch.zeros(3),
        "running_var": torch.full((3,), 2.0),
    }
    old = OrderedDict(sd)
    old._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    bn.load_state_dict(old)
    assert torch.equal(bn.running_var, torch.full((3,), 2.0) - 1e-5)
    # Round trip of the current version is exact; a BatchNorm step counter is ignored.
    saved = bn.state_dict()
    assert saved._metadata[""]["version"] == 3  # type: ignore[attr-defined]
    other = FrozenBatchNorm2d(3)
    saved["num_batches_tracked"] = torch.tensor(7)
    other.load_state_dict(saved)
    assert torch.equal(other.running_var, bn.running_var) and torch.equal(other.weight, weight)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_stride_in_1x1_places_stride(stride_in_1x1: bool) -> None:
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    resnet = build_resnet_backbone(cfg, IMAGE)
    for name in ("res3", "res4", "res5"):
        block = getattr(resnet, name)[0]
        assert block.conv1.kernel_size == (1, 1) and block.conv2.kernel_size == (3, 3)
        expect_1x1, expect_3x3 = ((2, 2), (1, 1)) if stride_in_1x1 else ((1, 1), (2, 2))
        assert block.conv1.stride == expect_1x1 and block.conv2.stride == expect_3x3
        assert block.conv3.stride == (1, 1) and block.shortcut.stride == (2, 2)
    assert resnet.stem.conv1.stride == (2, 2) and resnet.stem.conv1.kernel_size == (7, 7)
    assert all(b.conv1.stride == (1, 1) and b.conv2.stride == (1, 1) for b in resnet.res2)


class _FixedFeatures(Backbone):
    """A bottom-up stand-in returning given feature maps (res2..res5, strides 4..32)."""

    def __init__(self, features: dict[str, Tensor]) -> None:
        super().__init__()
        self.features = features
        self._out_features = list(features)
        self._out_feature_channels = {k: v.shape[1] for k, v in features.items()}
        self._out_feature_strides = {f"res{i}": 2**i for i in range(2, 6)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.features


def test_fpn_top_down_by_hand() -> None:
    rng = np.random.default_rng(1)
    channels = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}
    sizes = {"res2": (16, 24), "res3": (8, 12), "res4": (4, 6), "res5": (2, 3)}
    feats = {k: rng.normal(size=(1, c, *sizes[k])).astype(np.float32) for k, c in channels.items()}
    out_c = 2
    fpn = FPN(
        _FixedFeatures({k: torch.from_numpy(v) for k, v in feats.items()}),
        list(channels),
        out_c,
        top_block=LastLevelMaxPool(),
    )
    lateral_w, lateral_b = {}, {}
    with torch.no_grad():
        for k, c in channels.items():
            level = k[-1]
            lateral_w[k] = rng.normal(size=(out_c, c)).astype(np.float32)
            lateral_b[k] = rng.normal(size=out_c).astype(np.float32)
            lat = getattr(fpn, f"fpn_lateral{level}")
            lat.weight.copy_(torch.from_numpy(lateral_w[k])[:, :, None, None])
            lat.bias.copy_(torch.from_numpy(lateral_b[k]))
            out = getattr(fpn, f"fpn_output{level}")  # identity 3x3 (centre tap), bias = 10 * level
            out.weight.zero_()
            out.weight[:, :, 1, 1] = torch.eye(out_c)
            out.bias.fill_(10.0 * int(level))
        got = fpn(torch.zeros(1, 3, 64, 96))

    def lateral(k: str) -> np.ndarray:
        return np.einsum("oc,bchw->bohw", lateral_w[k], feats[k]) + lateral_b[k][None, :, None, None]

    prev = lateral("res5")
    expected = {"p5": prev + 50.0}
    for lvl in (4, 3, 2):
        up = prev.repeat(2, axis=2).repeat(2, axis=3)  # nearest 2x
        prev = lateral(f"res{lvl}") + up
        expected[f"p{lvl}"] = prev + 10.0 * lvl
    expected["p6"] = expected["p5"][:, :, ::2, ::2]
    assert list(got) == ["p2", "p3", "p4", "p5", "p6"]
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_last_level_max_pool_odd_sizes() -> None:
    x = torch.randn(1, 2, 25, 42)
    (p6,) = LastLevelMaxPool()(x)
    assert p6.shape == (1, 2, 13, 21)
    assert torch.equal(p6, x[:, :, ::2, ::2])


def test_weight_init_like_detectron2(r50_fpn: FPN) -> None:
    conv = r50_fpn.bottom_up.res4[0].conv3  # 1x1, 256 -> 1024: MSRA fill, std = sqrt(2 / fan_out)
    std = math.sqrt(2.0 / 1024)
    assert abs(conv.weight.std().item() / std - 1.0) < 0.03 and conv.bias is None
    lateral = r50_fpn.fpn_lateral5  # Caffe2 Xavier fill: U(-sqrt(3/fan_in), sqrt(3/fan_in)), bias 0
    bound = math.sqrt(3.0 / 2048)
    w = lateral.weight
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    assert abs(w.std().item() / (bound / math.sqrt(3.0)) - 1.0) < 0.03
    assert torch.count_nonzero(lateral.bias) == 0 and torch.count_nonzero(r50_fpn.fpn_output2.bias) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_traced_backbone_matches_eager_on_new_size() -> None:
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    model = build_resnet_fpn_backbone(cfg, IMAGE).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), strict=False)
        x = torch.randn(2, 3, 96, 128)
        ref, got = model(x), traced(x)
    assert list(got) == list(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.RESNETS.DEPTH", 42, "DEPTH"),
        ("MODEL.RESNETS.NUM_GROUPS", 32, "NUM_GROUPS"),
        ("MODEL.RESNETS.NORM", "SyncBN", "SyncBN"),
        ("MODEL.FPN.FUSE_TYPE", "max", "FUSE_TYPE"),
        ("MODEL.BACKBONE.NAME", "build_vit_backbone", "BACKBONE.NAME"),
        ("MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"], "IN_FEATURES"),
    ],
)
def test_bad_config_is_a_clear_error(key: str, value: object, match: str) -> None:
    cfg = _r50_cfg()
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        build_backbone(cfg)
