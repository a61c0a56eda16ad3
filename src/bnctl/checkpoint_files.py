"""Read a checkpoint safely and check its BatchNorm statistics.

Checkpoints are read only with ``torch.load(..., weights_only=True)``: reading
a file never runs code from it. BatchNorm layers are found by their keys
(``<prefix>.running_mean`` with ``<prefix>.running_var``), so no model class
is needed.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .state import never_updated

__all__ = ["CheckpointError", "LayerCheck", "check_checkpoint", "load_state_dict"]

_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema")
NEAR_ZERO_VAR = 1e-8
NEAR_ZERO_WEIGHT = 1e-6
EXTREME = 1e6


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of tensors; the message says why in one line."""


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from ``path`` with ``weights_only=True``.

    Accepts a state dict, or a dict holding one under a common key
    (``"state_dict"``, ``"model"``, ...); strips prefixes that every key
    shares from a wrapper: ``module.`` (DDP), ``model.`` (Lightning),
    ``_orig_mod.`` (``torch.compile``).

    Raises:
        CheckpointError: the file is missing, corrupt, holds pickled objects
            (a whole model), or contains no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # the weights-only unpickler met garbage
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt, or another format).") from err
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects (a whole model?), and "
            "bnctl reads checkpoints with weights_only=True so that no code in them runs. Save "
            "model.state_dict() instead."
        ) from err
    except Exception as err:  # a corrupt file can fail anywhere in the reader
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}).") from err
    state = _find_state_dict(obj)
    if state is None:
        if isinstance(obj, dict):
            what = "an empty dict" if not obj else f"a dict without tensors (keys {_keys(obj)})"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path}: expected a state dict (a dict of tensors, possibly under one of "
            f"{list(_CONTAINER_KEYS)}), found {what}. Save model.state_dict() (or a dict holding it)."
        )
    stripped = True
    while state and stripped:  # DDP's "module.", Lightning's "model.", torch.compile's "_orig_mod."
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _keys(obj: dict) -> str:
    keys = [repr(k) for k in list(obj)[:5]]
    return ", ".join(keys) + (", ..." if len(obj) > 5 else "")


def _find_state_dict(obj: Any) -> dict[str, Tensor] | None:
    if not isinstance(obj, dict):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:
        return tensors
    for key in _CONTAINER_KEYS:
        found = _find_state_dict(obj.get(key))
        if found is not None:
            return found
    return None


@dataclass
class LayerCheck:
    """The checks of one BatchNorm layer found in a checkpoint."""

    name: str
    channels: int
    num_batches_tracked: int | None
    problems: list[str] = field(default_factory=list)
    domain: str = "default"


def check_checkpoint(state: dict[str, Tensor]) -> list[LayerCheck]:
    """Check every BatchNorm layer (found by its keys) of a state dict.

    Per-domain statistics (bnctl's ``running_mean__<domain>`` keys) are
    checked like the default ones. Flags: tensors that are not 1-D real
    floating-point tensors of one length (the rest of the checks are skipped then), statistics never
    updated (all 0 and 1 with ``num_batches_tracked`` 0 or absent),
    non-finite values, channels with near-zero variance or weight, extreme
    values, a ``num_batches_tracked`` that is not a finite count.
    """
    checks = []
    for p, suffix in _layers(state):
        domain = suffix[2:] or "default"
        rm, rv = state.get(p + "running_mean" + suffix), state.get(p + "running_var" + suffix)
        if rv is None:
            continue
        found = {k: state.get(p + k + suffix, state.get(p + k)) for k in _TENSORS}
        tensors = {k: t for k, t in found.items() if t is not None}
        check = LayerCheck(p.rstrip(".") or "<root>", _channels(rm), None, domain=domain)
        nbt, nbt_problem = _count(state.get(p + "num_batches_tracked" + suffix))
        check.num_batches_tracked = nbt
        if nbt_problem:
            check.problems.append(nbt_problem)
        layout = _layout_problems(tensors)
        if layout:
            check.problems += layout
        else:
            check.problems += _value_problems(tensors, nbt)
        checks.append(check)
    return checks


_TENSORS = ("running_mean", "running_var", "weight", "bias")


def _layers(state: dict[str, Tensor]) -> list[tuple[str, str]]:
    """``(prefix, domain suffix)`` of every set of statistics: ``running_mean`` keys, and
    bnctl's per-domain ``running_mean__<domain>`` keys."""
    found = []
    for key in state:
        head, sep, domain = key.rpartition("running_mean__")
        if sep and domain.isidentifier():
            found.append((head, "__" + domain))
        elif key.endswith("running_mean"):
            found.append((key[: -len("running_mean")], ""))
    return found


def _channels(t: Any) -> int:
    return t.shape[0] if isinstance(t, Tensor) and t.dim() >= 1 else 0


def _count(t: Any) -> tuple[int | None, str | None]:
    """``num_batches_tracked`` as an int, or a problem when it is not a finite count."""
    if t is None:
        return None, None
    if not (isinstance(t, Tensor) and t.layout == torch.strided and not t.is_meta and t.numel() == 1
            and not t.is_complex() and not t.is_quantized):
        return None, f"num_batches_tracked: expected a count (one integer), got {_describe(t)}"
    value = t.item()
    if not math.isfinite(value) or value < 0 or value != int(value):
        return None, f"num_batches_tracked: expected a count (a whole number >= 0), got {value!r}"
    return int(value), None


def _describe(t: Any) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    kind = "meta" if t.is_meta else "quantized" if t.is_quantized else str(t.layout).replace("torch.", "")
    return f"a {kind} {str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)}"


def _layout_problems(tensors: dict[str, Any]) -> list[str]:
    """Problems that make the values unreadable as per-channel statistics."""
    problems = []
    for key, t in tensors.items():
        if not (isinstance(t, Tensor) and t.layout == torch.strided and not t.is_meta and not t.is_quantized
                and t.is_floating_point() and t.dim() == 1):
            problems.append(f"{key}: expected a 1-D floating-point tensor, got {_describe(t)}")
    if not problems:
        lengths = {key: t.numel() for key, t in tensors.items()}
        if len(set(lengths.values())) > 1:
            problems.append(f"expected one length per channel, got {lengths}")
    return problems


def _value_problems(tensors: dict[str, Tensor], nbt: int | None) -> list[str]:
    problems = []
    rmf, rvf = tensors["running_mean"].double(), tensors["running_var"].double()
    if never_updated(rmf, rvf, nbt):
        problems.append("statistics never updated (all 0 and 1)")
    for key, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            problems.append(f"non-finite values in {key} ({bad} channel{'s' if bad > 1 else ''})")
    finite_rv = rvf[torch.isfinite(rvf)]
    negative = int((finite_rv < 0).sum())
    if negative:
        problems.append(f"{negative} channel(s) with negative running_var (a variance cannot be negative; "
                        "normalizing takes its square root: NaN or huge outputs)")
    low = int((finite_rv.abs() < NEAR_ZERO_VAR).sum())
    if low:
        problems.append(f"{low} channel(s) with near-zero running_var (< {NEAR_ZERO_VAR:g})")
    w = tensors.get("weight")
    if w is not None:
        wf = w.double()
        zero_w = int((wf[torch.isfinite(wf)].abs() < NEAR_ZERO_WEIGHT).sum())
        if zero_w:
            problems.append(f"{zero_w} channel(s) with near-zero weight (< {NEAR_ZERO_WEIGHT:g})")
    big = [k for k, t in (("running_mean", rmf), ("running_var", rvf))
           if bool((t[torch.isfinite(t)].abs() > EXTREME).any())]
    if big:
        problems.append(f"extreme values (> {EXTREME:g}) in {', '.join(big)}")
    return problems


def checks_as_records(checks: list[LayerCheck]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
