"""Relative error of a tensor against its expected value, shared by the tests."""

import math

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor, terms: float = 0.0) -> float:
    """||got - want|| / max(||want||, terms / 100), in float64.

    terms is the summed size of the terms that `want` adds up. A gradient whose terms cancel down to
    less than 1% of them (in attention, exactly to 0 when no query sees two keys, or with n = 1 for
    dbias) is held to rounding errors of the size of its terms, not of the cancelled sum.
    """
    want = want.detach().double().cpu()
    diff = (got.detach().double().cpu() - want).norm().item()
    denominator = max(want.norm().item(), terms / 100)
    if denominator == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / denominator
