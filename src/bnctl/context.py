"""Where a forward runs: eagerly, or captured by a compiler, an exporter, a tracer or a transform.

A layer forward probes this once (:func:`current`) and passes the answer down;
nothing below it probes again. Captured code takes no branch on a tensor's
value (the graph would bake in one batch's outcome) and changes no Python
state (a compiled graph would not repeat it), so the forward chooses other,
equivalent ops there:

================  ==============================================================
flag              set while
================  ==============================================================
``COMPILING``     ``torch.compile`` (dynamo) or ``torch.export`` traces the code
``EXPORTING``     ``torch.export`` (ONNX's default exporter included) or
                  ``torch.jit.trace`` (ONNX's TorchScript exporter) records it
``TRANSFORMED``   a ``torch.func`` transform (``vmap``, ``grad``, ...) is active
================  ==============================================================

``EAGER`` (0) is none of them; any other value is :func:`captured`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["COMPILING", "EAGER", "EXPORTING", "TRANSFORMED", "batched", "captured", "current"]

EAGER = 0
COMPILING = 1
EXPORTING = 2
TRANSFORMED = 4


def current() -> int:
    """The flags of the context this code runs in (see the module docstring); ``EAGER`` is 0.

    Example:
        >>> current() == EAGER
        True
        >>> bool(torch.func.vmap(lambda x: torch.tensor(current() & TRANSFORMED))(torch.zeros(2)).all())
        True
    """
    if torch.compiler.is_compiling():  # (a constant under dynamo: the branch is resolved at trace time)
        ctx = COMPILING
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            ctx |= EXPORTING
    else:
        ctx = EXPORTING if torch._C._is_tracing() else EAGER
    if torch._C._are_functorch_transforms_active():
        ctx |= TRANSFORMED
    return ctx


def captured() -> bool:
    """Whether this code runs compiled, exported, traced or transformed (not eagerly)."""
    return current() != EAGER


def batched(t: Tensor) -> bool:
    """Whether ``t`` is seen through ``torch.func.vmap`` (one slice per vmapped model or sample)."""
    return torch._C._functorch.is_batchedtensor(t)
