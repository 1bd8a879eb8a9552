"""A tiny model memorises a fixed batch for each task family: the whole training path learns."""

import pytest
import torch

from omniflow.objective import FlowObjective, flow_loss
from omniflow.presets import PRESETS, build_transformer
from omniflow.tasks import get_task


@pytest.mark.parametrize("task", ["t2i", "i2t", "t2a"])
def test_overfit_fixed_batch(task):
    torch.manual_seed(0)
    model = build_transformer("tiny").train()
    g = torch.Generator().manual_seed(0)
    x0 = {m: torch.randn(4, *s, generator=g) for m, s in PRESETS["tiny"].latent_shapes().items()}
    tasks = [get_task(task)] * 4
    objective = FlowObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def step() -> torch.Tensor:
        # the same seed every step: the same noise, times and rule draws, i.e. a fixed batch
        out = flow_loss(model, x0, tasks, objective=objective, generator=torch.Generator().manual_seed(1))
        return out.loss

    first = step().item()
    for _ in range(300):
        optimizer.zero_grad()
        loss = step()
        loss.backward()
        optimizer.step()
    last = step().item()
    print(f"{task}: loss {first:.4f} -> {last:.4f}")
    assert last < first / 10, f"{task}: loss {first:.4f} -> {last:.4f}"
