"""Every touchpoint with another library's internals, in one place.

qlorakit reads and writes things the libraries it builds on do not promise to keep: attributes of PEFT's LoRA
layers, bitsandbytes' quantized parameters and layer flags, transformers' attention registry and module shapes,
accelerate's grad scaler, private torch ops. Each touchpoint lives in the module named after its library and is
checked where qlorakit first relies on it (loading, installing the fast path, guarding a trainer): when an upstream
release renames or reshapes one, qlorakit raises `UpstreamError` naming the library, what changed and the versions
qlorakit supports — never a silent fallback to a slower path, or a check that checks nothing.

    peft.py          LoRA layers: which they are, and what the fused kernels need from one (LoRAParts)
    bitsandbytes.py  quantized weights: what kind, dequantized to a dense tensor, the layer flags the policy pins
    transformers.py  the attention registry, the gated-MLP and RMSNorm formulas (checked, not assumed), the output
                     head, activation checkpointing, the quantizer a GGUF conversion drops
    accelerate.py    the grad scaler of an Accelerator
    torch_private.py private torch ops: the CPU flash-attention kernels, the global module hooks
"""

from __future__ import annotations

import functools
import re

from ..errors import UpstreamError


@functools.lru_cache(maxsize=None)
def supported_range(package: str) -> str:
    """The requirement qlorakit declares for `package` (pyproject's range, read from the installed metadata)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("qlorakit") or []
    except PackageNotFoundError:  # running from a source tree that was never installed
        return package
    for requirement in requirements:
        spec = requirement.split(";")[0].strip()
        if re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-") == package.lower():
            return spec
    return package


def installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def changed(package: str, what: str, why: str = "") -> UpstreamError:
    """The error for an upstream internal that is not what qlorakit relies on: names the library, its installed
    version, the internal, and the range qlorakit supports."""
    wanted = supported_range(package)
    return UpstreamError(
        f"{package} {installed_version(package)} changed {what}{f' ({why})' if why else ''}; qlorakit relies on it "
        f"and supports {wanted}. Install a supported version (pip install '{wanted}'), or report this to qlorakit"
    )


def require(package: str, owner, attribute: str, owner_name: str) -> object:
    """`getattr(owner, attribute)`, or the UpstreamError naming `owner_name.attribute` when it is gone."""
    try:
        return getattr(owner, attribute)
    except AttributeError:
        raise changed(package, f"{owner_name}.{attribute}", "it is gone") from None
