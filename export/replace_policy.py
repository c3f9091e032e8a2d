"""The one rule for an output path that already exists: replace it only when frcnn wrote it, or on request.

Which files count as "written by us" depends on what is about to be written there:

- ``"onnx"``: an ONNX file whose producer is ``frcnn-deploy`` (``export-engine --output``);
- ``"engine"``: a TensorRT engine with its frcnn sidecar (``export-engine --engine``);
- ``"int8"``: an ONNX file whose metadata says ``precision: int8`` (the Q/DQ copy, ``--int8`` /
  ``quantize_onnx``): an fp32 frcnn model found at the int8 path is refused too.

Any other existing file is refused with one ``UserError`` unless ``overwrite`` is given (``--overwrite``, or
``overwrite=True`` in the API). A folder is left to the writability checks.
"""

from __future__ import annotations

from pathlib import Path

from frcnn.runtime.errors import UserError

__all__ = ["KINDS", "check_replaceable", "written_by_frcnn"]

KINDS = ("onnx", "engine", "int8")


def _onnx_metadata(path: Path) -> tuple[str, dict[str, str]] | None:
    """(producer name, metadata) of an ONNX file, or None when it is not one (any parse / IO error)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file at all (any protobuf/IO error): not ours
        return None
    return model.producer_name, {p.key: p.value for p in model.metadata_props}


def written_by_frcnn(path: str | Path, kind: str) -> bool:
    """Whether the existing file ``path`` is a ``kind`` file (one of KINDS) that frcnn wrote."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "engine":
        from frcnn.export import engine

        try:
            engine.read_sidecar(Path(path))
        except UserError:
            return False
        return True
    found = _onnx_metadata(Path(path))
    if found is None:
        return False
    if kind == "onnx":
        return found[0] == "frcnn-deploy"
    from frcnn.export.quantize import PRECISION_KEY

    return found[1].get(PRECISION_KEY) == "int8"


def check_replaceable(path: str | Path, overwrite: bool, kind: str, label: str,
                      remedy: str = "pass --overwrite") -> None:
    """UserError when ``path`` exists, is a file, is not a ``kind`` file frcnn wrote and ``overwrite`` is False.

    label: how the message names the path (``"--output"``, ``"the int8 output"``); remedy: how the caller
    overrides the refusal (``"pass --overwrite"``, ``"pass overwrite=True"``).
    """
    target = Path(path)
    if overwrite or not target.exists() or target.is_dir() or written_by_frcnn(target, kind):
        return
    writer = "frcnn's int8 quantizer" if kind == "int8" else "export-engine"
    raise UserError(f"{label} {target} already exists and was not written by {writer}; {remedy} to replace it, "
                    f"or choose another path (without it, such a file is never overwritten)")
