"""Adapting only BatchNorm: fine-tuning its affine part, test-time adaptation (TENT and relatives).

:func:`train_only_batchnorm` freezes every parameter except the BatchNorm
weights and biases and gives the BatchNorm layers a policy (by default
``frozen_stats``: running statistics, learning affine) in one call, in the
right order. :func:`prepare_test_time` also puts every module in eval and
gives the BatchNorm layers a policy that normalizes with batch statistics
even in eval (optionally blended with the stored ones). Both return a handle
that lists the parameters to optimize and undoes everything.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .apply import PolicyHandle, Selector, apply, batchnorm_layers
from .policy import PRESETS, Policy, get_policy

__all__ = ["BatchNormOnlyHandle", "TestTimeHandle", "prepare_test_time", "train_only_batchnorm"]


class BatchNormOnlyHandle:
    """What :func:`train_only_batchnorm` or :func:`prepare_test_time` changed; ``remove()``
    restores it exactly.

    Attributes:
        params: the BatchNorm affine parameters to optimize.
        layers: qualified names of the adapted BatchNorm layers.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        policy_handle: PolicyHandle,
        training: dict[nn.Module, bool],
        requires_grad: dict[nn.Parameter, bool],
        params: list[nn.Parameter],
    ) -> None:
        self._policy_handle = policy_handle
        self._training = training
        self._requires_grad = requires_grad
        self.params = params
        self.layers = list(policy_handle.layers)

    def remove(self) -> None:
        """Restore policies, ``requires_grad`` flags and ``training`` flags (idempotent)."""
        self._policy_handle.remove()
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)
        self._requires_grad = {}
        for module, flag in self._training.items():
            module.training = flag
        self._training = {}

    def __enter__(self) -> BatchNormOnlyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


TestTimeHandle = BatchNormOnlyHandle
"""The handle :func:`prepare_test_time` returns (the same class)."""


def _only_batchnorm(
    model: nn.Module, policy: Policy, include: Selector, exclude: Selector, *, evaluate: bool
) -> BatchNormOnlyHandle:
    """Freeze every parameter, then apply ``policy`` (which may let BatchNorm's affine learn);
    with ``evaluate``, every module goes to eval too."""
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        handle = apply(model, policy, include, exclude)
    except BaseException:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    if evaluate:
        model.eval()
    params = [
        p for _, layer in batchnorm_layers(model, include, exclude) for p in layer.parameters(recurse=False)
        if p.requires_grad
    ]
    return BatchNormOnlyHandle(handle, training, requires_grad, params)


def train_only_batchnorm(
    model: nn.Module,
    policy: str | Policy = "frozen_stats",
    *,
    include: Selector = None,
    exclude: Selector = None,
) -> BatchNormOnlyHandle:
    """Train only the BatchNorm weights and biases of ``model``, in place, in one call.

    Every parameter stops requiring grad, then the selected BatchNorm layers
    get ``policy`` with ``learn_affine=True``: the default ``frozen_stats``
    normalizes with the running statistics and never updates them (Keras'
    ``trainable=False`` on the rest of the model); ``"torch"`` keeps batch
    statistics and their updates in ``train()`` (Lightning's
    ``freeze(train_bn=True)``). ``train()``/``eval()`` flags are left to the
    training loop. The order matters and is done for you: freezing the model
    after applying a learning policy would leave nothing trainable.

    Args:
        model: the model.
        policy: a preset name or a :class:`bnctl.Policy` for the BatchNorm layers.
        include, exclude: which BatchNorm layers learn (as in :func:`bnctl.apply`).

    Returns:
        A :class:`BatchNormOnlyHandle`: ``.params`` to give an optimizer,
        ``.layers``, and ``remove()`` (or its ``with`` block) to restore the
        model exactly.

    Raises:
        ValueError: a policy with ``learn_affine=False``, or no BatchNorm
            weight or bias to train (layers built with ``affine=False``).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> with train_only_batchnorm(model) as only_bn:
        ...     opt = torch.optim.SGD(only_bn.params, lr=0.1)
        ...     print(len(only_bn.params), model[0].weight.requires_grad, model[1].policy.name)
        2 False frozen_stats
    """
    resolved = get_policy(policy)
    if resolved.learn_affine is False:
        raise ValueError(
            f"expected a policy whose affine part learns, got {resolved.label!r} (learn_affine=False): "
            "nothing would train. Use 'frozen_stats' (running statistics) or 'torch' (batch statistics)."
        )
    if resolved.learn_affine is None:
        resolved = dataclasses.replace(resolved, learn_affine=True)
    handle = _only_batchnorm(model, resolved, include, exclude, evaluate=False)
    if not handle.params:
        handle.remove()
        raise ValueError(
            "expected BatchNorm weights or biases to train, got none: the selected layers were built "
            "with affine=False."
        )
    return handle


def prepare_test_time(
    model: nn.Module,
    *,
    alpha: float | None = None,
    include: Selector = None,
    exclude: Selector = None,
) -> TestTimeHandle:
    """Prepare ``model`` for test-time adaptation of its BatchNorm layers, in place.

    * every module goes to eval (dropout off) and every parameter stops
      requiring grad;
    * the selected BatchNorm layers get the ``test_time`` preset: batch
      statistics in train and eval, nothing updated, affine learns. With
      ``alpha``, they normalize with ``alpha * batch + (1 - alpha) * running``
      statistics instead (Schneider et al. 2020's prior BN; gradients flow
      through the batch part);
    * the returned handle's ``params`` are the BatchNorm weights and biases
      to give an optimizer (TENT minimizes the prediction entropy over them).

    Args:
        model: the model.
        alpha: blend weight of the batch statistics in ``[0, 1]``, or ``None``
            for batch statistics alone.
        include, exclude: which BatchNorm layers adapt (as in :func:`bnctl.apply`).

    Returns:
        A :class:`BatchNormOnlyHandle` (``TestTimeHandle``); ``remove()`` (or
        leaving its ``with`` block) restores the model exactly.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
        ...                             torch.nn.Dropout(0.5))
        >>> with prepare_test_time(model) as tta:
        ...     opt = torch.optim.SGD(tta.params, lr=1e-3)
        ...     print(len(tta.params), model.training, model[0].weight.requires_grad)
        2 False False
        >>> model.training, model[0].weight.requires_grad
        (True, True)
    """
    policy = PRESETS["test_time"]
    if alpha is not None:
        policy = Policy(alpha, "none", alpha, "none", learn_affine=True, name="test_time_blend")
    return _only_batchnorm(model, policy, include, exclude, evaluate=True)
