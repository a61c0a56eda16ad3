"""Read a checkpoint safely and check its BatchNorm statistics.

Checkpoints are read only with ``torch.load(..., weights_only=True)``: reading
a file never runs code from it. BatchNorm layers are found by their keys
(``<prefix>.running_mean`` with ``<prefix>.running_var``), so no model class
is needed.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CheckpointError", "LayerCheck", "check_checkpoint", "load_state_dict"]

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema")
NEAR_ZERO_VAR = 1e-8
NEAR_ZERO_WEIGHT = 1e-6
EXTREME = 1e6


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of tensors; the message says why in one line."""


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from ``path`` with ``weights_only=True``.

    Accepts a state dict, or a dict holding one under a common key
    (``"state_dict"``, ``"model"``, ...); strips ``module.`` prefixes (DDP).

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
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects (a whole model?), and "
            "bnctl reads checkpoints with weights_only=True so that no code in them runs. Save "
            "model.state_dict() instead."
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}).") from err
    state = _find_state_dict(obj)
    if state is None:
        raise CheckpointError(
            f"{path}: expected a state dict (a dict of tensors, possibly under "
            f"{list(_CONTAINER_KEYS)}), got {type(obj).__name__}."
        )
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


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


def check_checkpoint(state: dict[str, Tensor]) -> list[LayerCheck]:
    """Check every BatchNorm layer (found by its keys) of a state dict.

    Flags: statistics never updated (all 0 and 1 with ``num_batches_tracked``
    0 or absent), non-finite values, channels with near-zero variance or
    weight, extreme values.
    """
    prefixes = [k[: -len("running_mean")] for k in state if k.endswith("running_mean")]
    checks = []
    for p in prefixes:
        rm, rv = state.get(p + "running_mean"), state.get(p + "running_var")
        if rv is None:
            continue
        nbt_t = state.get(p + "num_batches_tracked")
        nbt = int(nbt_t) if nbt_t is not None and nbt_t.numel() == 1 else None
        w, b = state.get(p + "weight"), state.get(p + "bias")
        check = LayerCheck(p.rstrip(".") or "<root>", rm.numel(), nbt)
        rmf, rvf = rm.double(), rv.double()
        if not nbt and bool((rmf == 0).all()) and bool((rvf == 1).all()):
            check.problems.append("statistics never updated (all 0 and 1)")
        for key, t in (("running_mean", rm), ("running_var", rv), ("weight", w), ("bias", b)):
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                check.problems.append(f"non-finite values in {key} ({int((~torch.isfinite(t)).sum())} channels)")
        finite_rv = rvf[torch.isfinite(rvf)]
        low = int((finite_rv.abs() < NEAR_ZERO_VAR).sum())
        if low:
            check.problems.append(f"{low} channel(s) with near-zero running_var (< {NEAR_ZERO_VAR:g})")
        if w is not None:
            wf = w.double()
            zero_w = int((wf[torch.isfinite(wf)].abs() < NEAR_ZERO_WEIGHT).sum())
            if zero_w:
                check.problems.append(f"{zero_w} channel(s) with near-zero weight (< {NEAR_ZERO_WEIGHT:g})")
        big = [k for k, t in (("running_mean", rmf), ("running_var", rvf))
               if bool((t[torch.isfinite(t)].abs() > EXTREME).any())]
        if big:
            check.problems.append(f"extreme values (> {EXTREME:g}) in {', '.join(big)}")
        checks.append(check)
    return checks


def checks_as_records(checks: list[LayerCheck]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
