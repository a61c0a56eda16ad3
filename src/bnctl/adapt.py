"""Test-time adaptation: prepare a model so only BatchNorm adapts (TENT and relatives).

:func:`prepare_test_time` puts every module in eval, freezes every
parameter, and gives the BatchNorm layers a policy that normalizes with
batch statistics even in eval (optionally blended with the stored ones) and
lets their affine parameters learn. The returned handle lists the
parameters to optimize and undoes everything.
"""

from __future__ import annotations

from torch import nn

from .apply import PolicyHandle, Selector, apply, batchnorm_layers
from .policy import PRESETS, Policy

__all__ = ["TestTimeHandle", "prepare_test_time"]


class TestTimeHandle:
    """What :func:`prepare_test_time` changed; ``remove()`` restores it exactly.

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

    def __enter__(self) -> TestTimeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


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
        A :class:`TestTimeHandle`; ``remove()`` (or leaving its ``with`` block)
        restores the model exactly.

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
    model.eval()
    params = [
        p for _, layer in batchnorm_layers(model, include, exclude) for p in layer.parameters(recurse=False)
        if p.requires_grad
    ]
    return TestTimeHandle(handle, training, requires_grad, params)
