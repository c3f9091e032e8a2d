"""What a Triton kernel may need at launch, checked before its PTX goes into a TensorRT engine.

Triton (>= 3.3) appends two hidden pointer parameters to every kernel, ``global_scratch`` and
``profile_scratch``, and may ask its own launcher for clusters, programmatic dependent launch (PDL), a
cooperative grid or host-built TMA tensor descriptors. TensorRT's AOT plugin launch knows none of this: it
launches the PTX with the plugin's inputs, int32 extras and outputs, pads the missing trailing arguments with
null (NVIDIA's Torch-TensorRT logs "AOT Plugin: ... hidden args ... Padding") and uses a plain grid. That is
correct only when every field below has its neutral value; anything else would read or write through a null
pointer, or run without the launch attributes the kernel was compiled for.

The fields are those of Triton's ``CompiledKernel.metadata`` (``KernelMetadata``), read on Triton 3.9 here.
A field missing from the metadata fails the check (fail closed), and :func:`check_triton_version` refuses a
Triton outside :data:`CHECKED_TRITON`, the range whose metadata names were checked.
"""

from __future__ import annotations

from typing import Any

from frcnn.runtime.errors import UserError
from frcnn.runtime.tensorrt_env import parse_version

__all__ = ["CHECKED_TRITON", "LAUNCH_FIELDS", "TRITON_REQUIREMENT", "check_launch_safety", "check_triton_version",
           "launch_fields"]

CHECKED_TRITON = ((3, 5), (3, 10))
"""Triton versions ``[low, high)`` whose ``KernelMetadata`` field names this check reads (3.9 executed here)."""
TRITON_REQUIREMENT = f"triton>={CHECKED_TRITON[0][0]}.{CHECKED_TRITON[0][1]},<{CHECKED_TRITON[1][0]}." \
                     f"{CHECKED_TRITON[1][1]}"  # fmt: skip
"""The pin of the ``plugins`` extra in pyproject.toml (a test keeps the two equal)."""

_NULL_SCRATCH = "TensorRT passes null for Triton's hidden {}-scratch pointer"
LAUNCH_FIELDS: dict[str, tuple[Any, str]] = {
    "global_scratch_size": (0, (f"{_NULL_SCRATCH.format('global')}; remove what needs it (device-side "
                               "tl.make_tensor_descriptor / TMA, large tl.device_assert buffers)")),
    "profile_scratch_size": (0, (f"{_NULL_SCRATCH.format('profile')}; compile without instrumentation "
                                "(proton / TRITON_*_PROFILE settings)")),
    "num_ctas": (1, "TensorRT's AOT launch sets no cluster dimensions; compile with num_ctas=1"),
    "launch_pdl": (False, ("TensorRT's AOT launch sets no programmatic-dependent-launch attribute; compile "
                          "without launch_pdl")),
    "launch_cooperative_grid": (False, ("TensorRT's AOT launch is not cooperative; compile without "
                                       "launch_cooperative_grid")),
    "tensordesc_meta": ([], ("host-built TMA tensor descriptors are extra launch arguments TensorRT does not "
                            "pass; use plain pointers (tl.load / tl.store) in the kernel")),
}
"""metadata field -> (the only accepted value, why + fix). ``None`` counts as ``[]`` for tensordesc_meta."""


def launch_fields(metadata: Any, what: str) -> dict[str, Any]:
    """The :data:`LAUNCH_FIELDS` of a Triton ``KernelMetadata`` as a JSON-able dict.

    Raises UserError when a field is absent (a Triton whose metadata this check does not know).
    """
    missing = [name for name in LAUNCH_FIELDS if not hasattr(metadata, name)]
    if missing:
        import triton

        raise UserError(f"PTX build of {what}: Triton {triton.__version__}'s kernel metadata has no "
                        f"{', '.join(missing)}, so the launch-safety check cannot run; install "
                        f"\"{TRITON_REQUIREMENT}\" (pip install -e \".[plugins]\")")
    fields = {}
    for name in LAUNCH_FIELDS:
        value = getattr(metadata, name)
        fields[name] = list(value) if isinstance(value, (list, tuple)) else value
    return fields


def check_launch_safety(fields: dict[str, Any], what: str) -> None:
    """UserError naming ``what`` (the kernel), the first offending field and the fix; None when safe.

    Args:
        fields: :func:`launch_fields` of the compiled kernel (or the same dict from the PTX cache).
        what: the kernel configuration and arch, for the message.
    """
    for name, (required, fix) in LAUNCH_FIELDS.items():
        if name not in fields:
            raise UserError(f"PTX build of {what}: the launch field {name} was not recorded; delete the PTX "
                            f"cache entry (or the whole cache folder) and build again")
        value = [] if name == "tensordesc_meta" and fields[name] is None else fields[name]
        if value != required or type(value) is not type(required):
            raise UserError(f"PTX build of {what}: {name} = {fields[name]!r}, must be {required!r} for TensorRT's "
                            f"AOT plugin launch: {fix}")


def check_triton_version(version: str | None = None) -> None:
    """UserError unless the Triton version (installed one by default) is in :data:`CHECKED_TRITON`."""
    if version is None:
        try:
            import triton
        except ImportError as exc:
            raise UserError(f"building PTX needs Triton ({exc}); install \"{TRITON_REQUIREMENT}\" "
                            f"(pip install -e \".[plugins]\")") from None
        version = str(triton.__version__)
    low, high = CHECKED_TRITON
    if not low <= parse_version(version)[:2] < high:
        raise UserError(f"Triton {version} is outside the range whose kernel metadata the PTX launch-safety "
                        f"check was written for ({TRITON_REQUIREMENT}); install it with "
                        f"pip install \"{TRITON_REQUIREMENT}\" (a newer Triton needs the check re-verified "
                        f"in frcnn/plugins/launch_safety.py first)")
