"""Checks on state dicts loaded from other layouts (the reference release, SD3): every key placed,
every shape right, and errors that name what is wrong.

    >>> check_fits(converted, model.state_dict(), what="SD3 checkpoint")
    >>> model.load_state_dict(model.state_dict() | converted)
"""

from collections.abc import Callable, Mapping

import torch


def preview(keys: list[str], limit: int = 20) -> str:
    """Keys for an error message; a wrong config can mismatch thousands of them."""
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} and {len(keys) - limit} more"


def check_fits(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    what: str,
    required: Callable[[str], bool] = lambda key: True,
) -> None:
    """Raise ValueError unless `state` fits `expected`: no key `expected` lacks, every key of
    `expected` that is `required` present, and every shape equal."""
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if required(k))
    if missing or unexpected:
        raise ValueError(f"{what} does not fit the model: missing keys {preview(missing)}; "
                         f"unexpected keys {preview(unexpected)}")
    wrong = [f"{k}: {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{what}: shapes differ from the model's: {preview(wrong)}")
