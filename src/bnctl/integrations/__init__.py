"""bnctl inside other libraries' training loops (optional extras, imported only when used).

* :mod:`bnctl.integrations.lightning`: ``BatchNormPolicy``, a PyTorch Lightning callback that applies a policy
  or a :class:`bnctl.Schedule` for the length of ``trainer.fit``.
"""
