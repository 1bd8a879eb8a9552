"""Learning-rate schedule shared by every trainer in the project."""

import math


def warmup_cosine(step: int, *, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier for the peak learning rate: linear warm-up over `warmup` steps, then cosine
    decay to `floor` at step `total`.

    Example:
        >>> torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total=1000, warmup=50))
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
