"""Checkpoints: .pth/.pkl round trips, refused code-running pickles, readable mismatch reports, atomic saves."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from frcnn.runtime.errors import CheckpointError
from frcnn.trainer.checkpoint import (
    convert_c2_names,
    load_checkpoint,
    load_checkpoint_state,
    load_into_model,
    save_checkpoint,
)
from torch import nn

R50_BLOCKS = (3, 4, 6, 3)
R101_BLOCKS = (3, 4, 23, 3)


class _FrozenBN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.randn(c))


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1, bias=False)
        self.norm = _FrozenBN(cout)


def _tiny_detector(blocks=R50_BLOCKS, num_classes: int = 80) -> nn.Module:
    """A few-kB stand-in with detectron2 key names (stem, bottleneck stages, box predictor)."""
    bottom_up = nn.Module()
    bottom_up.stem = nn.Module()
    bottom_up.stem.conv1 = _Conv(3, 2)
    for stage, n in zip(range(2, 6), blocks):
        layers = nn.Sequential()
        for i in range(n):
            block = nn.Module()
            if i == 0:
                block.shortcut = _Conv(2, 2)
            block.conv1, block.conv2, block.conv3 = _Conv(2, 2), _Conv(2, 2), _Conv(2, 2)
            layers.append(block)
        setattr(bottom_up, f"res{stage}", layers)
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.bottom_up = bottom_up
    model.roi_heads = nn.Module()
    model.roi_heads.box_predictor = nn.Module()
    model.roi_heads.box_predictor.cls_score = nn.Linear(8, num_classes + 1)
    model.roi_heads.box_predictor.bbox_pred = nn.Linear(8, 4 * num_classes)
    return model


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _one_paragraph_error(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_round_trip_strict(tmp_path, suffix):
    src, dst = _tiny_detector(), _tiny_detector()
    path = tmp_path / f"model{suffix}"
    save_checkpoint(path, src, iteration=7)
    meta = load_checkpoint(dst, path)
    _assert_same(src, dst)
    assert meta["iteration"] == 7
    assert os.listdir(tmp_path) == [path.name]  # no temp file left


def test_pkl_is_detectron2_model_zoo_format(tmp_path):
    path = tmp_path / "m.pkl"
    save_checkpoint(path, _tiny_detector())
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "frcnn-deploy"
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())


def test_format_detected_by_content_and_variants(tmp_path):
    src = _tiny_detector()
    sd = src.state_dict()
    # torch.save zip with a .pkl suffix; a bare state dict; a DDP prefix.
    torch.save({"model": sd}, tmp_path / "zip.pkl")
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    # Plain protocol-2 pickle (bytes go through _codecs.encode, as in py2-era files) with a .pth suffix.
    arrays = {"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "Detectron2 Model Zoo"}
    (tmp_path / "plain.pth").write_bytes(pickle.dumps(arrays, protocol=2))
    for name in ("zip.pkl", "bare.pth", "ddp.pth", "plain.pth"):
        dst = _tiny_detector()
        load_checkpoint(dst, tmp_path / name)
        _assert_same(src, dst)
    _, meta = load_checkpoint_state(tmp_path / "plain.pth")
    assert meta == {"__author__": "Detectron2 Model Zoo"}


def test_torch_legacy_format(tmp_path):
    src, dst = _tiny_detector(), _tiny_detector()
    torch.save({"model": src.state_dict()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pth").read_bytes()[:1] == b"\x80"
    load_checkpoint(dst, tmp_path / "legacy.pth")
    _assert_same(src, dst)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    save_checkpoint(path, _tiny_detector())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(_tiny_detector(), path)
    assert "truncated or corrupted" in _one_paragraph_error(excinfo, path)


def test_not_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "random.pth": (b"\x11" + rng.bytes(1000), "not a checkpoint"),
        "random_pickle_header.pkl": (b"\x80\x02" + rng.bytes(1000), "truncated or corrupted"),
        "empty.pth": (b"", "empty"),
        "list.pkl": (pickle.dumps([1, 2, 3]), "holds a list"),
        "strings.pkl": (pickle.dumps({"model": {"a.weight": "hello"}}), "'a.weight' is a str"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as excinfo:
            load_checkpoint(_tiny_detector(), tmp_path / name)
        assert pattern in _one_paragraph_error(excinfo, tmp_path / name), name
    with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
        load_checkpoint_state(tmp_path / "missing.pth")


class _Evil:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_code_running_pickles_are_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = {"model": {"a.weight": _Evil(str(sentinel))}}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(evil, protocol=2))
    torch.save(evil, tmp_path / "evil.pth")
    (tmp_path / "eval.pkl").write_bytes(pickle.dumps({"model": _EvilEval()}))
    expected = {"evil.pkl": ".system", "evil.pth": ".system", "eval.pkl": "builtins.eval"}
    for name, global_name in expected.items():
        with pytest.raises(CheckpointError) as excinfo:
            load_checkpoint(_tiny_detector(), tmp_path / name)
        msg = _one_paragraph_error(excinfo, tmp_path / name)
        assert "Refusing to load" in msg and global_name in msg, msg
    assert not sentinel.exists()


def test_wrong_class_count(tmp_path):
    path = tmp_path / "three_classes.pth"
    save_checkpoint(path, _tiny_detector(num_classes=3))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(_tiny_detector(num_classes=80), path)
    msg = _one_paragraph_error(excinfo, path)
    assert "roi_heads.box_predictor: 4 shape mismatches" in msg
    assert "cls_score.weight (4, 8) in file vs (81, 8) in model" in msg
    assert "set MODEL.ROI_HEADS.NUM_CLASSES to 3" in msg


def test_wrong_architecture(tmp_path):
    path = tmp_path / "r101.pkl"
    save_checkpoint(path, _tiny_detector(R101_BLOCKS))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(_tiny_detector(R50_BLOCKS), path)
    msg = _one_paragraph_error(excinfo, path)
    assert "backbone.bottom_up: 255 unexpected keys (res4.6..22)" in msg  # 17 blocks x 15 keys
    assert "set MODEL.RESNETS.DEPTH to 101" in msg
    assert "missing" not in msg
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(_tiny_detector(R101_BLOCKS), tmp_path / "r50.pth")  # missing file
    path50 = tmp_path / "r50.pth"
    save_checkpoint(path50, _tiny_detector(R50_BLOCKS))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(_tiny_detector(R101_BLOCKS), path50)
    msg = _one_paragraph_error(excinfo, path50)
    assert "backbone.bottom_up: 255 missing keys (res4.6..22)" in msg and "DEPTH to 50" in msg


def test_non_strict_loads_what_matches(tmp_path, caplog):
    src = _tiny_detector(num_classes=3)
    path = tmp_path / "m.pth"
    save_checkpoint(path, src)
    dst = _tiny_detector(num_classes=80)
    before = dst.roi_heads.box_predictor.cls_score.weight.clone()
    with caplog.at_level(logging.WARNING, logger="frcnn.trainer.checkpoint"):
        load_checkpoint(dst, path, strict=False)
    assert "NUM_CLASSES to 3" in caplog.text
    assert torch.equal(dst.roi_heads.box_predictor.cls_score.weight, before)
    assert torch.equal(
        dst.backbone.bottom_up.res5[2].conv3.weight, src.backbone.bottom_up.res5[2].conv3.weight
    )


def test_strict_failure_loads_nothing_and_extras_are_ignored():
    src, dst = _tiny_detector(), _tiny_detector()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    state = dict(src.state_dict())
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="bogus: 1 unexpected key"):
        load_into_model(dst, state, path="x.pth")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    del state["bogus.weight"]
    state["pixel_mean"] = torch.zeros(3, 1, 1)  # held by old detectron2 checkpoints, not a parameter
    report = load_into_model(dst, state)
    assert report.ignored == ["pixel_mean"] and report.ok
    _assert_same(src, dst)


def test_caffe2_names_are_converted_to_detectron2_names(tmp_path, d2_key_shapes):
    blobs = {
        "conv1_w": np.zeros((64, 3, 7, 7), np.float32),
        "res_conv1_bn_s": np.ones(64, np.float32),
        "res_conv1_bn_b": np.zeros(64, np.float32),
        "res2_0_branch1_w": np.zeros((256, 64, 1, 1), np.float32),
        "res2_0_branch1_bn_s": np.ones(256, np.float32),
        "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32),
        "res2_0_branch2a_bn_b": np.zeros(64, np.float32),
        "res2_0_branch2a_bn_s": np.full(64, 2, np.float32),
        "res5_2_branch2c_w": np.zeros((2048, 512, 1, 1), np.float32),
        "fc1000_w": np.zeros((1000, 2048), np.float32),
        "fc1000_b": np.zeros(1000, np.float32),
        "res2_0_branch2a_w_momentum": np.zeros((64, 64, 1, 1), np.float32),
    }
    (tmp_path / "R-50.pkl").write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    state, meta = load_checkpoint_state(tmp_path / "R-50.pkl")
    assert meta["converted_from_c2"]
    for key, value in state.items():  # every converted name is a real detectron2 R50-FPN key and shape
        assert d2_key_shapes[key] == tuple(value.shape), key
    assert len(state) == 9 + 6  # 9 blobs kept + mean/var for the 3 norms
    assert torch.equal(state["backbone.bottom_up.res2.0.conv1.norm.running_var"], torch.ones(64))
    assert torch.equal(state["backbone.bottom_up.stem.conv1.norm.running_mean"], torch.zeros(64))
    assert convert_c2_names({"res3_1_branch2b_bn_rm": 0})  # explicit statistics keep their values
    assert "backbone.bottom_up.res3.1.conv2.norm.running_mean" in convert_c2_names(
        {"res3_1_branch2b_bn_rm": 0}
    )


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "m.pkl"
    save_checkpoint(path, _tiny_detector())
    good = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, _tiny_detector(), hook=lambda: 0)  # fails mid-write
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["m.pkl"]
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="Cannot write checkpoint"):
        save_checkpoint(blocker / "m.pth", _tiny_detector())
    assert sorted(os.listdir(tmp_path)) == ["m.pkl", "not_a_dir"]


def test_big_endian_arrays_and_non_numeric_entries(tmp_path):
    data = {"model": {"a.weight": np.arange(3, dtype=">f4"), "b": np.array(["x", 1], dtype=object)}}
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(CheckpointError, match="'b' is a ndarray object"):
        load_checkpoint_state(tmp_path / "m.pkl")
    del data["model"]["b"]
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(data, protocol=2))
    state, _ = load_checkpoint_state(tmp_path / "m.pkl")
    assert torch.equal(state["a.weight"], torch.tensor([0.0, 1.0, 2.0]))
