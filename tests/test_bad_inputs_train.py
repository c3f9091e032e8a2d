"""Issue 9, trainer/export side: every bad input gets exit 2 (or a UserError subclass), one message naming the
problem, no traceback, and nothing left behind (the whole work tree, hidden files included, is compared
before and after). Also: Ctrl-C (SIGINT) in `frcnn train` / `export-engine`, SIGKILL temp-file cleanup,
class names stored by `frcnn train` and used by the exporter and the Predictor."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from frcnn.export.cli import main as export_main
from frcnn.runtime.cli import main as frcnn_main
from frcnn.trainer.data import synthesize_dataset
from PIL import Image

TINY = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
        "SEED", "3", "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0"]  # fmt: skip
RETINANET_YAML = """# detectron2 Base-RetinaNet.yaml + COCO-Detection/retinanet_R_50_FPN_1x.yaml, merged
MODEL:
  META_ARCHITECTURE: "RetinaNet"
  BACKBONE:
    NAME: "build_retinanet_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res3", "res4", "res5"]
    DEPTH: 50
  ANCHOR_GENERATOR:
    SIZES: !!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] for x in [32, 64, 128, 256, 512 ]]"]
  FPN:
    IN_FEATURES: ["res3", "res4", "res5"]
  RETINANET:
    IOU_THRESHOLDS: [0.4, 0.5]
    IOU_LABELS: [0, -1, 1]
    SMOOTH_L1_LOSS_BETA: 0.1
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.01
VERSION: 2
"""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset and one finished 1-iteration training run (read-only for the cases)."""
    root = tmp_path_factory.mktemp("shared")
    synthesize_dataset(root / "ds", num_images=6, size=128, num_classes=3, seed=0)
    rc = frcnn_main(["train", "--config", "frcnn-small-R18.yaml", "--data", str(root / "ds"), "--output",
                     str(root / "run"), "--no-progress", *TINY, "SOLVER.MAX_ITER", "1"])  # fmt: skip
    assert rc == 0
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


class Ctx:
    """What a case's setup gets: a fresh work folder with a (hard-linked) copy of the data and the run."""

    def __init__(self, work: Path, shared: Path) -> None:
        self.work = work
        shutil.copytree(shared / "ds", work / "ds", copy_function=os.link)
        shutil.copytree(shared / "run", work / "run", copy_function=os.link)
        self.data, self.run = work / "ds", work / "run"
        self.ckpt = self.run / "model_final.pth"

    def file(self, name: str, content: bytes | str) -> str:
        p = self.work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(p)

    def replace(self, path: Path, content: bytes) -> None:
        path.unlink()  # hard-linked: never write through to the shared copy
        path.write_bytes(content)

    def edit_json(self, edit: Callable[[dict], None]) -> None:
        path = self.data / "annotations" / "instances_train.json"
        data = json.loads(path.read_text())
        edit(data)
        self.replace(path, json.dumps(data).encode())

    def train(self, *args: str, config: str = "frcnn-small-R18.yaml", output: str | None = None) -> list[str]:
        options = list(args[:2]) if args and args[0].startswith("--") else []
        return ["train", "--config", config, "--data", str(self.data), "--output", output or str(self.work / "out"),
                "--no-progress", *options, *TINY, "SOLVER.MAX_ITER", "1", *args[len(options):]]  # fmt: skip

    def resume(self, *args: str) -> list[str]:
        return ["train", "--config", "frcnn-small-R18.yaml", "--data", str(self.data), "--output", str(self.run),
                "--no-progress", "--resume", *TINY, "SOLVER.MAX_ITER", "2", *args]  # fmt: skip


def _image(ctx: Ctx, index: int = 0) -> Path:
    name = json.loads((ctx.data / "annotations" / "instances_train.json").read_text())["images"][index]
    return ctx.data / "train" / name["file_name"]


def _png(size: tuple[int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _truncate_all(ctx: Ctx) -> None:
    """Every training image keeps its header (the up-front probe passes) but loses its pixel data."""
    for path in sorted((ctx.data / "train").iterdir()):
        ctx.replace(path, path.read_bytes()[:300])


def _lock_by_live_process(ctx: Ctx) -> list[str]:
    (ctx.run / ".frcnn-train.lock").write_text(f"{os.getppid()}\n")
    return ctx.resume()


def _ann(key: str, value):
    def edit(data: dict) -> None:
        data["annotations"][0][key] = value
    return edit


def _bbox(value: float) -> Callable[[dict], None]:
    return _ann("bbox", [10.0, 10.0, value, 20.0])


def _dup_ids(data: dict) -> None:
    data["images"][1]["id"] = data["images"][0]["id"]


# (id, entry point, setup(ctx) -> argv, regex the one message must match)
TRAIN_CASES = [
    ("cfg-latin1", lambda c: c.train(config=c.file("l.yaml", b"MODEL:\n  DEVICE: \"caf\xe9\"\n")), r"l\.yaml' is not UTF-8 text"),
    ("cfg-binary", lambda c: c.train(config=str(c.ckpt)), r"binary file, not YAML"),
    ("cfg-png", lambda c: c.train(config=c.file("x.yaml", _png((8, 8)))), r"binary file|not UTF-8"),
    ("cfg-list", lambda c: c.train(config=c.file("l.yaml", "- 1\n- 2\n")), r"must hold a mapping"),
    ("cfg-scalar", lambda c: c.train(config=c.file("s.yaml", "hello\n")), r"must hold a mapping"),
    ("cfg-dir", lambda c: c.train(config=str(c.data)), r"is a directory"),
    ("cfg-int-key", lambda c: c.train(config=c.file("k.yaml", "1: 2\n")), r"key 1 is a int"),
    ("cfg-bad-yaml", lambda c: c.train(config=c.file("b.yaml", "MODEL: [\n")), r"not valid YAML"),
    ("cfg-python-tag", lambda c: c.train(config=c.file("t.yaml", "SEED: !!python/object/apply:os.getpid []\n")),
     r"SEED uses the YAML tag"),
    ("cfg-retinanet", lambda c: c.train(config=c.file("retinanet_R_50_FPN_1x.yaml", RETINANET_YAML)),
     r"META_ARCHITECTURE 'RetinaNet', which frcnn does not build"),
    ("cfg-section-scalar", lambda c: c.train(config=c.file("m.yaml", "MODEL: 3\n")), r"MODEL must be a mapping"),
    ("cfg-missing", lambda c: c.train(config=str(c.work / "nope.yaml")), r"neither a file nor a packaged"),
    ("override-type", lambda c: c.train("SOLVER.MAX_ITER", "abc"), r"SOLVER.MAX_ITER: expected int"),
    ("override-section", lambda c: c.train("SOLVER", "3"), r"SOLVER must be a mapping"),
    ("lr-nan", lambda c: c.train("SOLVER.BASE_LR", "nan"), r"SOLVER.BASE_LR = nan: must be a finite number"),
    ("lr-negative", lambda c: c.train("SOLVER.BASE_LR", "-0.1"), r"SOLVER.BASE_LR = -0.1"),
    ("max-iter-negative", lambda c: c.train("SOLVER.MAX_ITER", "-5"), r"SOLVER.MAX_ITER = -5: must be an integer >= 1"),
    ("batch-zero", lambda c: c.train("SOLVER.IMS_PER_BATCH", "0"), r"SOLVER.IMS_PER_BATCH = 0"),
    ("workers-negative", lambda c: c.train("DATALOADER.NUM_WORKERS", "-1"), r"NUM_WORKERS = -1"),
    ("num-classes-0", lambda c: c.train("--num-classes", "0"), r"--num-classes 0 is smaller"),
    ("num-classes-text", lambda c: c.train("--num-classes", "three"), r"give 'auto' or a positive integer"),
    ("output-is-file", lambda c: c.train(output=c.file("out.txt", "mine")), r"is a file, not a folder"),
    ("output-under-file", lambda c: c.train(output=str(Path(c.file("f", "x")) / "sub")), r"is a file, so the folder"),
    ("output-has-foreign-config", lambda c: (Path(c.file("mine/config.yaml", "SEED: 1\n")),
                                             c.train(output=str(c.work / "mine")))[1],
     r"holds a config.yaml that `frcnn train` did not write"),
    ("output-in-data", lambda c: c.train(output=str(c.data / "runs")), r"inside the dataset folder"),
    ("resume-dangling", lambda c: (c.ckpt.unlink(), c.resume())[1], r"model_final.pth does not exist.*Refusing"),
    ("resume-corrupt", lambda c: (c.replace(c.ckpt, c.ckpt.read_bytes()[:5000]), c.resume())[1],
     r"truncated or corrupted"),
    ("resume-other-config", lambda c: c.resume("MODEL.FPN.OUT_CHANNELS", "64"),
     r"does not match the model.*Resume with the config the run was started with"),
    ("resume-weights-only", lambda c: (torch.save({"model": torch.load(c.ckpt, weights_only=True)["model"]},
                                                  str(c.work / "w.pth")), c.replace(c.ckpt, (c.work / "w.pth").read_bytes()),
                                       c.resume())[2], r"is not a training checkpoint"),
    ("resume-pointer-binary", lambda c: (c.replace(c.run / "last_checkpoint", b"\xff\xfe\x00"), c.resume())[1],
     r"cannot read .*last_checkpoint|does not exist"),
    ("concurrent-run", _lock_by_live_process, r"another `frcnn train` \(pid \d+\) is writing"),
    ("bbox-nan", lambda c: (c.edit_json(_bbox(float("nan"))), c.train())[1], r"non-finite value"),
    ("bbox-inf", lambda c: (c.edit_json(_bbox(float("inf"))), c.train())[1], r"non-finite value"),
    ("bbox-string", lambda c: (c.edit_json(_ann("bbox", [1, 2, "3", 4])), c.train())[1], r"'bbox' must be 4 numbers"),
    ("duplicate-image-id", lambda c: (c.edit_json(_dup_ids), c.train())[1], r"repeats image id"),
    ("image-garbage", lambda c: (c.replace(_image(c), os.urandom(3000)), c.train())[1],
     r"cannot be used: .* not an image file"),
    ("image-empty", lambda c: (c.replace(_image(c), b""), c.train())[1], r"not an image file"),
    ("image-wrong-size", lambda c: (c.replace(_image(c), _png((64, 48))), c.train())[1],
     r"is 64x48 \(WxH\) but .* says 128x128"),
    ("image-truncated-in-worker", lambda c: (_truncate_all(c), c.train("DATALOADER.NUM_WORKERS", "1"))[1],
     r"cannot read image .*\.png: image file is truncated"),
    ("data-is-file", lambda c: ["train", "--config", "frcnn-small-R18.yaml", "--data", c.file("d.json", "{}"),
                                "--output", str(c.work / "out")], r"--data .*d\.json is a file"),
    ("log-period-zero", lambda c: c.train("--log-period", "0"), r"--log-period 0: give a number"),
    ("min-size-train-zero", lambda c: c.train("INPUT.MIN_SIZE_TRAIN", "(0,)"), r"INPUT.MIN_SIZE_TRAIN .* must be >= 1"),
    ("weights-missing", lambda c: c.train("MODEL.WEIGHTS", str(c.work / "gone.pth")), r"Cannot read checkpoint .*gone"),
    ("weights-dir", lambda c: c.train("MODEL.WEIGHTS", str(c.run)), r"is a directory; pass the checkpoint file"),
    ("weights-not-a-model", lambda c: c.train("MODEL.WEIGHTS", c.file("w.pkl", b"\x80\x04K\x01.")),
     r"holds a int, not a dict"),
    ("option-after-overrides", lambda c: c.train("SOLVER.BASE_LR", "0.01", "--resume"),
     r"--resume must come before the KEY VALUE overrides"),
    ("json-not-utf8", lambda c: (c.replace(c.data / "annotations" / "instances_train.json", b'{"images": "\xff"}'),
                                 c.train())[1], r"is not UTF-8"),
    ("eval-config-latin1", lambda c: ["eval", "--config", c.file("l.yaml", b"SEED: 1 # caf\xe9\n"), "--weights",
                                      str(c.ckpt), "--data", str(c.data), "--output", str(c.work / "ev")],
     r"not UTF-8 text"),
    ("eval-config-retinanet", lambda c: ["eval", "--config", c.file("r.yaml", RETINANET_YAML), "--weights",
                                         str(c.ckpt), "--data", str(c.data), "--output", str(c.work / "ev")],
     r"RetinaNet"),
]


def _export(c: Ctx, *args: str, ckpt: str | None = None) -> list[str]:
    return [ckpt or str(c.ckpt), "--output", str(c.work / "m.onnx"), *args]


EXPORT_CASES = [
    ("ckpt-dir", lambda c: _export(c, ckpt=str(c.run)), r"is a directory; pass the checkpoint file"),
    ("ckpt-empty", lambda c: _export(c, ckpt=c.file("e.pth", b"")), r"is empty"),
    ("ckpt-text", lambda c: _export(c, ckpt=c.file("t.pth", "hello")), r"is not a checkpoint"),
    ("ckpt-truncated", lambda c: _export(c, ckpt=c.file("t.pth", c.ckpt.read_bytes()[:4000])), r"truncated or corrupted"),
    ("config-latin1", lambda c: _export(c, "--config", c.file("l.yaml", b"SEED: 1 # \xe9\n")), r"not UTF-8 text"),
    ("config-binary", lambda c: _export(c, "--config", str(c.ckpt)), r"binary file"),
    ("config-retinanet", lambda c: _export(c, "--config", c.file("r.yaml", RETINANET_YAML)),
     r"RetinaNet', which frcnn does not build"),
    ("config-other-model", lambda c: _export(c, "--config", "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"),
     r"stores 3 class names but the config has MODEL.ROI_HEADS.NUM_CLASSES 80"),
    ("config-other-depth", lambda c: _export(c, "--config", c.file("d.yaml", "_BASE_: " + str(c.run / "config.yaml")
                                                                    + "\nMODEL:\n  RESNETS:\n    DEPTH: 34\n")),
     r"does not match the model.*Pass the --config the checkpoint was trained with"),
    ("class-names-count", lambda c: _export(c, "--class-names", "a,b"), r"gives 2 names but the model has 3 classes"),
    ("class-names-empty-item", lambda c: _export(c, "--class-names", "a,,c"), r"non-empty name"),
    ("class-names-missing-file", lambda c: _export(c, "--class-names", "names.txt"), r"names.txt: no such file"),
    ("class-names-json-dict", lambda c: _export(c, "--class-names", c.file("n.json", '{"a": 1}')), r"JSON list of strings"),
    ("class-names-file-count", lambda c: _export(c, "--class-names", c.file("n.txt", "a\nb\nc\nd\n")),
     r"gives 4 names but the model has 3"),
    ("output-not-ours", lambda c: [str(c.ckpt), "--output", c.file("precious.onnx", "user data")],
     r"precious.onnx already exists and was not written by export-engine; pass --overwrite"),
    ("engine-not-ours", lambda c: _export(c, "--engine", c.file("my.engine", "user data")),
     r"my.engine already exists and was not written"),
    ("output-is-ckpt", lambda c: [str(c.ckpt), "--output", str(c.ckpt)], r"is the checkpoint itself"),
    ("engine-is-output", lambda c: _export(c, "--engine", str(c.work / "m.onnx")), r"same file as the checkpoint or --output"),
    ("output-under-file", lambda c: [str(c.ckpt), "--output", str(Path(c.file("f", "x")) / "m.onnx")], r"does not exist|not a"),
    ("fp16-without-engine", lambda c: _export(c, "--fp16"), r"--fp16 applies to the TensorRT engine only"),
]


DEMO_CASES = [
    ("demo-output-is-file", lambda c: ["demo", "--output", c.file("f.txt", "x")], r"--output .*f.txt is a file"),
    ("demo-output-not-ours", lambda c: ["demo", "--output", str(Path(c.file("mine/notes.txt", "x")).parent)],
     r"non-empty folder that an earlier `frcnn demo` did not create"),
    ("demo-output-under-file", lambda c: ["demo", "--output", str(Path(c.file("g", "x")) / "d")],
     r"cannot create the demo folder"),
    ("demo-iters-0", lambda c: ["demo", "--output", str(c.work / "d"), "--iters", "0"], r"--iters must be >= 1"),
]


def _check(ctx: Ctx, argv: list[str], main: Callable, pattern: str, capsys) -> None:
    before = _snapshot(ctx.work)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in out + err, err
    assert re.search(pattern, err, re.DOTALL), err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert _snapshot(ctx.work) == before, "the failed run left something behind or changed a file"


@pytest.mark.parametrize("name, setup, pattern", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_and_eval_refuse_bad_input(shared, tmp_path, capsys, name, setup, pattern) -> None:
    ctx = Ctx(tmp_path, shared)
    argv = setup(ctx)
    _check(ctx, argv, frcnn_main, pattern, capsys)


@pytest.mark.parametrize("name, setup, pattern", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_demo_refuses_bad_output_before_any_step(shared, tmp_path, capsys, name, setup, pattern) -> None:
    ctx = Ctx(tmp_path, shared)
    _check(ctx, setup(ctx), frcnn_main, pattern, capsys)


@pytest.mark.parametrize("name, setup, pattern", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_refuses_bad_input(shared, tmp_path, capsys, name, setup, pattern) -> None:
    ctx = Ctx(tmp_path, shared)
    argv = setup(ctx)
    _check(ctx, argv, export_main, pattern, capsys)


# ------------------------------------------------------------------------------------- signals and temp files
def _tmp_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock"))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(argv: list[str]) -> subprocess.Popen:
    # a session of its own, so that os.killpg reaches the process group like a terminal's Ctrl-C; SIGINT at its
    # default as in a terminal (a test run started in the background by a non-interactive shell ignores it, and
    # children would inherit that)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)  # noqa: PLW1509 - a signal reset, no locks involved


@pytest.mark.slow
def test_ctrl_c_in_train_names_the_last_checkpoint_and_the_resume_command(shared, tmp_path) -> None:
    ctx = Ctx(tmp_path, shared)
    out = tmp_path / "out"
    proc = _popen([sys.executable, "-m", "frcnn.runtime.cli", *ctx.train("SOLVER.MAX_ITER", "1000",
                   "SOLVER.CHECKPOINT_PERIOD", "1", "DATALOADER.NUM_WORKERS", "1")])  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "last_checkpoint").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = (out / "last_checkpoint").read_text().strip()
    iteration = torch.load(out / name, weights_only=True)["iteration"]
    assert f"The last checkpoint is {out / name} (iteration {iteration})" in err, err[-2000:]
    assert re.search(r"Resume from it with:\n  frcnn train --config frcnn-small-R18.yaml .* --resume ", err), err
    assert _tmp_files(tmp_path) == []


def test_ctrl_c_in_export_says_nothing_was_written(shared, tmp_path) -> None:
    target = tmp_path / "m.onnx"
    proc = _popen([sys.executable, "-m", "frcnn.export.cli", str(shared / "run" / "model_final.pth"), "--output",
                   str(target)])  # fmt: skip
    time.sleep(12)  # past the imports, inside the export (which takes far longer on this CPU)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert f"interrupted; nothing was written ({target} was not created)" in err, err
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path) -> None:
    from frcnn.runtime.fileio import atomic_write, remove_stale_temps

    target = tmp_path / "m.onnx"
    code = ("import sys, time\nfrom frcnn.runtime.fileio import atomic_writer\nwith atomic_writer(sys.argv[1]) as f:\n"
            "    f.write(b'x' * 4096); f.flush(); print('ready', flush=True); time.sleep(120)\n")  # fmt: skip
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    (left,) = tmp_path.glob(".m.onnx.*.tmp")
    assert f".m.onnx.{writer.pid}." in left.name
    assert remove_stale_temps(target) == [] and left.exists()  # a live writer's file is never touched
    writer.kill()
    writer.wait()
    old_legacy = tmp_path / ".m.onnx.abcd1234.tmp"  # pid-less name of earlier versions, from before this run
    old_legacy.write_bytes(b"old")
    os.utime(old_legacy, (time.time() - 3600, time.time() - 3600))
    keep = [tmp_path / n for n in (".m.onnx.notes.tmp", ".other.onnx.1.abcdefgh.tmp", "m.onnx.bak", ".m.onnx.12.x.tmp")]
    for p in keep:
        p.write_bytes(b"not ours")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert not left.exists() and not old_legacy.exists()
    assert all(p.read_bytes() == b"not ours" for p in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name] + [p.name for p in keep])


# ------------------------------------------------------------------------------------------------ class names
def test_training_stores_class_names_used_by_export_and_predictor(shared, tmp_path) -> None:
    from frcnn.export.class_names import resolve_class_names
    from frcnn.export.coco_names import COCO_CLASSES
    from frcnn.export.onnx_export import metadata
    from frcnn.trainer.predictor import Predictor
    from frcnn.trainer.train_cli import build_config

    cats = json.loads((shared / "ds" / "annotations" / "instances_train.json").read_text())["categories"]
    expected = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    ckpt = torch.load(shared / "run" / "model_final.pth", weights_only=True)
    assert ckpt["class_names"] == expected and ckpt["category_ids"] == sorted(c["id"] for c in cats)
    assert resolve_class_names(3, ckpt)[:2] == (expected, ckpt["category_ids"])
    assert resolve_class_names(3, ckpt, "a, b ,c")[0] == ["a", "b", "c"]
    names_file = tmp_path / "names.txt"
    names_file.write_text("cat\n\ndog\nbird\n")
    assert resolve_class_names(3, ckpt, str(names_file))[0] == ["cat", "dog", "bird"]
    assert resolve_class_names(80, {})[0] == list(COCO_CLASSES)  # model-zoo checkpoints: as before
    cfg = build_config(str(shared / "run" / "config.yaml"), [])
    assert Predictor(cfg, shared / "run" / "model_final.pth").class_names == expected
    props = metadata(cfg, expected, 18, 32, ckpt["category_ids"])
    assert json.loads(props["class_names"]) == expected
    assert json.loads(props["category_ids"]) == ckpt["category_ids"]
