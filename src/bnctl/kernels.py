"""One fused kernel for the guarded running-statistics update on CUDA (Triton).

A running update is small arithmetic on ``2 * C`` values, but composed from
PyTorch ops it costs a handful of tiny kernel launches (the EMA, a float64
sum for the guard, a masked copy, the counter increments): on a GPU, where
a BatchNorm layer's own kernel takes microseconds, those launches were most
of bnctl's overhead. :func:`ema_if_finite_` does it in one launch (one
program: a pass over the channels decides, a second writes): the new values
(an EMA of batch statistics, or values PyTorch's kernel already computed),
the all-or-nothing guard, the writes and the counters, without waiting for
the device.

It runs where Triton is importable and :func:`applies` accepts the
arguments (plain contiguous CUDA tensors on one device, buffers of one
dtype other than float64, at most :data:`MAX_CHANNELS` channels), outside
traced code (the compilers fuse the composed ops themselves); elsewhere
:mod:`bnctl.functional` composes the same update from PyTorch ops. That
composed path is the reference the tests compare this kernel with.
``BNCTL_TRITON=0`` in the environment turns the kernel off.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

try:  # an optional accelerator: PyTorch's CUDA wheels bring Triton, CPU wheels do not
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - not installed, or an installation that does not import
    triton = None

__all__ = ["applies", "ema_if_finite_", "usable"]

ENABLED = os.environ.get("BNCTL_TRITON", "1") != "0"
FAILED: str | None = None  # why the kernel could not run here (it is then not tried again)
_ON_CPU = False  # tests set it, with TRITON_INTERPRET=1, to run the kernel on CPU tensors
MAX_CHANNELS = 1 << 16  # one program loops over the channels: wider layers take the composed ops


def usable(*tensors: Tensor | None) -> bool:
    """Whether :func:`ema_if_finite_` can run on these tensors (``None`` entries are ignored):
    plain contiguous CUDA tensors (no subclass: a fake or wrapped tensor has no memory to launch on),
    none of them float64 (Triton passes the scalars in float32)."""
    if triton is None or not ENABLED or FAILED is not None:
        return False
    return all(t is None or (type(t) is Tensor and (t.is_cuda or _ON_CPU) and t.is_contiguous()
                             and t.dtype != torch.float64) for t in tensors)


def applies(running_mean: Tensor, running_var: Tensor, new_mean: Tensor, new_var: Tensor,
            counters: tuple[Tensor | None, ...] = ()) -> bool:
    """Whether :func:`ema_if_finite_` takes exactly these arguments: :func:`usable` tensors on one
    device, buffers of one dtype, values of their size (at most :data:`MAX_CHANNELS`), one-element
    int64 counters. Anything else is left to the composed ops (which raise where they should)."""
    present = [c for c in counters if c is not None]
    if not usable(running_mean, running_var, new_mean, new_var, *present):
        return False
    channels, device = running_mean.numel(), running_mean.device
    if channels > MAX_CHANNELS or running_var.dtype != running_mean.dtype:
        return False
    if any(t.numel() != channels or t.device != device for t in (running_var, new_mean, new_var)):
        return False
    return all(c.numel() == 1 and c.dtype == torch.int64 and c.device == device for c in present)


def ema_if_finite_(
    running_mean: Tensor,
    running_var: Tensor,
    new_mean: Tensor,
    new_var: Tensor,
    weight: float | None,
    var_factor: float = 1.0,
    counters: tuple[Tensor | None, ...] = (),
) -> Tensor | None:
    """Write new running statistics, all or none, in one launch; return whether they were written.

    With ``weight=None``, ``new_mean``/``new_var`` are the new values
    themselves. With a float ``weight``, they are a batch's mean and biased
    variance, and the new values are the EMA
    ``lerp(running, batch, weight)`` with the variance scaled by
    ``var_factor`` (``n / (n - 1)``; NaN for one value per channel), in the
    order and precision :func:`bnctl.functional.ema` uses. If any new value
    is non-finite nothing is written. Each tensor in ``counters`` (0-dim
    int64, e.g. ``num_batches_tracked``) is incremented when the values are
    written. The result is a 0-dim bool tensor on the device: nothing waits.
    ``None`` means the kernel could not be compiled or launched here: nothing
    was written, :data:`FAILED` says why, and :func:`usable` is False from then on.
    """
    channels = running_mean.numel()
    flag = torch.empty((), dtype=torch.bool, device=running_mean.device)
    present = [c for c in counters if c is not None]
    first = present[0] if present else flag
    second = present[1] if len(present) > 1 else first
    block = min(max(triton.next_power_of_2(channels), 16), 1024)
    args = (running_mean, running_var, new_mean, new_var, first, second, flag, channels,
            1.0 if weight is None else float(weight), float(var_factor))
    meta = dict(IS_EMA=weight is not None, COUNTERS=len(present), BLOCK=block)
    device = running_mean.device
    try:
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # Triton launches on the current device
                _ema_if_finite[(1,)](*args, **meta)
        else:
            _ema_if_finite[(1,)](*args, **meta)
    except Exception as err:  # compiling failed (a Triton or GPU this kernel does not support): nothing ran
        global FAILED
        FAILED = f"{type(err).__name__}: {err}"
        warnings.warn(f"bnctl: the fused Triton update failed to run ({FAILED}); using PyTorch ops from now on "
                      "(set BNCTL_TRITON=0 to skip it).", RuntimeWarning, stacklevel=2)
        return None
    return flag


if triton is not None:

    @triton.jit
    def _lerp(start, end, weight):
        # PyTorch's lerp: start + weight * (end - start) for |weight| < 0.5, else from the end.
        diff = end - start
        return tl.where(tl.abs(weight) < 0.5, start + weight * diff, end - diff * (1.0 - weight))

    @triton.jit
    def _new_values(rm_ptr, rv_ptr, m_ptr, v_ptr, offs, mask, weight, var_factor, IS_EMA: tl.constexpr):
        # the new values in the buffers' dtype (the guard checks what is written, after rounding)
        out_type = rm_ptr.dtype.element_ty
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if IS_EMA:
            # as functional.ema computes it: the unbiased variance in the statistics' dtype, both
            # rounded to the buffers' dtype, then PyTorch's lerp in float32 (never float64 here)
            unbiased = (v.to(tl.float32) * var_factor).to(v_ptr.dtype.element_ty)
            rm = tl.load(rm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = _lerp(rm, m.to(out_type).to(tl.float32), weight)
            v = _lerp(rv, unbiased.to(out_type).to(tl.float32), weight)
        return m.to(out_type), v.to(out_type)

    @triton.jit
    def _ema_if_finite(
        rm_ptr, rv_ptr, m_ptr, v_ptr, count1_ptr, count2_ptr, flag_ptr, channels, weight, var_factor,
        IS_EMA: tl.constexpr, COUNTERS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program: a first pass over the channels decides, a second one writes (or not).
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, channels, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < channels
            m, v = _new_values(rm_ptr, rv_ptr, m_ptr, v_ptr, offs, mask, weight, var_factor, IS_EMA)
            finite = ((m * 0.0) == 0.0) & ((v * 0.0) == 0.0)  # false for inf and nan
            bad = bad | (mask & ~finite).to(tl.int32)
        ok = tl.max(bad, axis=0) == 0
        for start in range(0, channels, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = (offs < channels) & ok
            m, v = _new_values(rm_ptr, rv_ptr, m_ptr, v_ptr, offs, mask, weight, var_factor, IS_EMA)
            tl.store(rm_ptr + offs, m, mask=mask)
            tl.store(rv_ptr + offs, v, mask=mask)
        step = ok.to(tl.int64)
        if COUNTERS >= 1:
            tl.store(count1_ptr, tl.load(count1_ptr) + step)
        if COUNTERS >= 2:
            tl.store(count2_ptr, tl.load(count2_ptr) + step)
        tl.store(flag_ptr, ok)
