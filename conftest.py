"""Doctest namespace: examples in docstrings may use ``torch`` and ``bnctl`` directly."""

import pytest
import torch

import bnctl


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["bnctl"] = bnctl
    torch.manual_seed(0)
