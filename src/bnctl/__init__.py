"""bnctl: explicit, per-layer control over BatchNorm in PyTorch.

PyTorch's ``module.training`` decides both which statistics normalize a
BatchNorm layer and whether its running statistics are updated. bnctl makes
each of these an explicit, reversible choice per layer: a :class:`Policy`.
"""

from .adapt import BatchNormOnlyHandle, TestTimeHandle, prepare_test_time, train_only_batchnorm
from .apply import PolicyHandle, apply, batchnorm_layers, param_groups, revert
from .compare import CompareResult, Setting, compare
from .domains import DEFAULT, add_domains, domains, export_domain, remove_domains
from .ecosystem import register_subclass, unregister_subclass
from .fold import FoldHandle, fold, unfold
from .functional import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .policy import (
    PRESETS,
    Mode,
    Policy,
    get_policy,
    momentum_from_decay,
    momentum_from_half_life,
    resolve_mode,
)
from .recalibrate import recalibrate
from .report import Report, report
from .schedule import Schedule
from .scopes import accumulate, checkpoint_context, domain, no_update, using
from .snapshots import restore, snapshot
from .stats import Accumulator

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "DEFAULT",
    "add_domains",
    "domain",
    "domains",
    "export_domain",
    "remove_domains",
    "FoldHandle",
    "fold",
    "unfold",
    "accumulate",
    "checkpoint_context",
    "compare",
    "CompareResult",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Mode",
    "PRESETS",
    "Policy",
    "PolicyHandle",
    "BatchNormOnlyHandle",
    "TestTimeHandle",
    "apply",
    "batch_norm",
    "batchnorm_layers",
    "get_policy",
    "momentum_from_decay",
    "momentum_from_half_life",
    "no_update",
    "param_groups",
    "prepare_test_time",
    "recalibrate",
    "register_subclass",
    "Report",
    "report",
    "resolve_mode",
    "restore",
    "revert",
    "Schedule",
    "Setting",
    "snapshot",
    "train_only_batchnorm",
    "unregister_subclass",
    "using",
]
