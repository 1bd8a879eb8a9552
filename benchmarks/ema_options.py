"""Which EMA a training run can use: the project's `omniflow.ema.EMA` against diffusers' `EMAModel`
and `torch.optim.swa_utils.AveragedModel`, under FSDP2 on two ranks (gloo, CPU) and unsharded.

    python benchmarks/ema_options.py --out runs/bench/ema_options.json

Each option averages a tiny transformer over a few real training steps (forward, backward, AdamW)
with the same decay, also with an evaluation forward (no backward) between steps, as validation
runs; the result is compared with the closed form of the same average computed from the gathered
weights after every step. Reported per option and layout: whether it ran, the error
against the closed form, whether the average stays sharded (bytes of average per rank), whether it
is keyed by parameter name (what checkpoints and model directories need), and its error if any.
"""

import argparse
import json
import os
import platform
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DECAY, STEPS = 0.9, 4


def _model():
    from omniflow.presets import build_transformer

    return build_transformer("tiny", seed=0)


def _batch(step: int):
    from omniflow.tasks import get_task
    from omniflow.training import Batch

    g = torch.Generator().manual_seed(step)
    latents = {"image": torch.randn(2, 4, 8, 8, generator=g), "text": torch.randn(2, 4, 16, generator=g),
               "audio": torch.randn(2, 4, 16, 8, generator=g)}
    return Batch(latents=latents, tasks=[get_task("t2i"), get_task("t2a")])


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


class Ours:
    name = "omniflow.ema.EMA"
    first_update_copies = False

    def __init__(self, model):
        from omniflow.ema import EMA

        self.ema = EMA(model, decay=DECAY)

    def update(self, model, step):
        self.ema.update(model, step)

    def averaged(self, model):
        return {k: _full(v) for k, v in self.ema.state_dict().items()}

    def tensors(self):
        return list(self.ema.state_dict().values())

    keyed_by_name = True


class Diffusers:
    name = "diffusers.training_utils.EMAModel"
    first_update_copies = True  # its decay is 0 for the first update after `update_after_step`

    def __init__(self, model):
        from diffusers.training_utils import EMAModel

        # min_decay = decay: a constant decay, as the project's EMA (EMAModel otherwise caps it at
        # (1 + n) / (10 + n) for the n-th update)
        self.ema = EMAModel(model.parameters(), decay=DECAY, min_decay=DECAY, update_after_step=0, foreach=False)
        self.names = [n for n, _ in model.named_parameters()]

    def update(self, model, step):
        self.ema.step(model.parameters())

    def averaged(self, model):
        return {n: _full(s) for n, s in zip(self.names, self.ema.shadow_params)}

    def tensors(self):
        return list(self.ema.shadow_params)

    keyed_by_name = False  # its state_dict holds `shadow_params` as a list in parameter order


class Averaged:
    name = "torch.optim.swa_utils.AveragedModel"

    def __init__(self, model):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
        self.names = [n for n, _ in model.named_parameters()]

    def update(self, model, step):
        self.ema.update_parameters(model)

    def averaged(self, model):
        return {n: _full(p) for n, p in zip(self.names, self.ema.module.parameters())}

    def tensors(self):
        return list(self.ema.module.parameters())

    keyed_by_name = True  # a deep copy of the module, its own state_dict
    first_update_copies = True  # its first update takes the weights as they are


OPTIONS = (Ours, Diffusers, Averaged)


def _measure(option, sharded: bool, eval_forward: bool = False) -> dict:
    from omniflow.objective import FlowObjective, flow_loss
    from omniflow.parallelize import ParallelConfig, parallelize
    from omniflow.training import OptimConfig, build_optimizer, build_scheduler, train_step

    model = _model()
    if sharded:
        model = parallelize(model, ParallelConfig(strategy="fsdp"), device=torch.device("cpu"))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-2, warmup_steps=0), total_steps=STEPS)
    expected = {n: _full(p) for n, p in model.named_parameters()}
    try:
        ema = option(model)
        for step in range(1, STEPS + 1):
            train_step(model, [_batch(step)], optimizer=optimizer, scheduler=scheduler, objective=FlowObjective())
            if eval_forward:  # as validation between two steps does: a forward without backward
                with torch.no_grad():
                    flow_loss(model, _batch(100 + step).latents, _batch(100 + step).tasks, objective=FlowObjective())
            ema.update(model, step)
            # After the step the root FSDP2 module keeps its gathered weights; read what the
            # optimizer stepped, the sharded parameters, gathered whole.
            for module in model.modules():
                if hasattr(module, "reshard"):
                    module.reshard()
            for n, p in model.named_parameters():
                copies = step == 1 and option.first_update_copies
                expected[n] = _full(p) if copies else DECAY * expected[n] + (1 - DECAY) * _full(p)
        got = ema.averaged(model)
        error = max(float((got[n] - expected[n]).abs().max()) for n in expected)
        local = sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in ema.tensors())
        return {"ran": True, "max_error_vs_closed_form": error, "average_bytes_this_rank": local,
                "keyed_by_name": option.keyed_by_name}
    except Exception as err:  # noqa: BLE001 - what fails is the finding
        return {"ran": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                "where": traceback.format_exc().strip().splitlines()[-3].strip()[:200]}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = {option.name: {"fsdp2": _measure(option, sharded=True),
                             "fsdp2_after_eval_forward": _measure(option, sharded=True, eval_forward=True)}
               for option in OPTIONS}
    if rank == 0:
        for option in OPTIONS:
            results[option.name]["unsharded"] = _measure(option, sharded=False)
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ema_options.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results_path = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(2, f"file://{tmp}/pg", results_path), nprocs=2)
        results = json.loads(Path(results_path).read_text())
    report = {"decay": DECAY, "steps": STEPS, "world_size": 2, "results": results,
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "diffusers": __import__("diffusers").__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
