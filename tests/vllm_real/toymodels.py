"""Tiny random models with some structure, for the real-engine tests (a random init is nearly uniform)."""

import copy

import torch


def peaked(model, factor: float = 3.0):
    """A copy with the final norm scaled: logits x factor, the next-token distribution still spread widely."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    return model


def chaotic(model, linear: float = 8.0, norm: float = 3.0):
    """A copy whose linear weights are scaled up: context-dependent, non-repeating greedy outputs (a plain
    random init repeats one or two tokens), with clear top-2 logit gaps (~1e-3 or more) for exact greedy comparisons."""
    model = peaked(model, norm)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(linear)
    return model
