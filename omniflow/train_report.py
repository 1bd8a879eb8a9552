"""What a training run reports between two log lines: sums over the steps, then one metrics dict
(loss per modality and task, throughput, data wait, grad norm, MFU) and its one-line form.

Pure bookkeeping, no collectives: every rank keeps its own `Meter`; ranks step in lockstep, so
throughput is one rank's samples times the world size.

    >>> meter = Meter()
    >>> meter.add(out, data_s=0.01, compute_s=0.2)           # after each train_step
    >>> metrics = summarize(meter, step=100, world=8, lr=1e-4, flops_per_sample=3e12, peak=989e12)
    >>> log_line(metrics)
    'step 100 | loss 0.4123 | image 0.391 | ... | 412.0 samples/s | data wait 1.2% | MFU 38.4%'
"""

import time
from collections import defaultdict

import numpy as np
import torch

# Peak dense bf16 TFLOP/s per device, for MFU when the config gives none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(device: torch.device, tflops: float | None = None) -> float | None:
    """FLOP/s of `device` at its peak: `tflops` when given, else from its name (None when unknown)."""
    if tflops is not None:
        return tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value * 1e12
    return None


class Meter:
    """Sums over the steps between two reports."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.data_s, self.compute_s = 0, 0, 0.0, 0.0
        self.loss, self.modality, self.task = 0.0, defaultdict(list), defaultdict(list)
        self.grad_norms: list[float] = []
        self.start = time.perf_counter()

    def add(self, out, data_s: float, compute_s: float) -> None:
        """One step's `training.StepOutput`, and the seconds it waited for data and computed."""
        self.steps += 1
        self.samples += out.samples
        self.data_s += data_s
        self.compute_s += compute_s
        self.loss += out.loss
        if out.grad_norm is not None:
            self.grad_norms.append(out.grad_norm)
        for k, v in out.per_modality.items():
            self.modality[k].append(v)
        for k, v in out.per_task.items():
            self.task[k].append(v)


def summarize(meter: Meter, *, step: int, world: int, lr: float, flops_per_sample: int, peak: float | None) -> dict:
    """The metrics of the steps `meter` holds (means per step; throughput over its wall time)."""
    elapsed = max(time.perf_counter() - meter.start, 1e-9)
    samples_per_s = meter.samples * world / elapsed  # every worker steps in lockstep
    metrics = {
        "step": step,
        "loss": meter.loss / meter.steps,
        "lr": lr,
        "samples_per_s": samples_per_s,
        "step_time_s": elapsed / meter.steps,
        "data_wait_s": meter.data_s / meter.steps,
        "compute_s": meter.compute_s / meter.steps,
        "data_wait_share": meter.data_s / elapsed,
        "tflops_per_s": flops_per_sample * samples_per_s / 1e12,
        "mfu": flops_per_sample * samples_per_s / (peak * world) if peak else None,
    }
    if meter.grad_norms:  # before clipping, averaged over the steps since the last report
        metrics["grad_norm"] = float(np.mean(meter.grad_norms))
    metrics.update({f"loss/{k}": float(np.mean(v)) for k, v in meter.modality.items()})
    metrics.update({f"task/{k}": float(np.mean(v)) for k, v in meter.task.items()})
    return metrics


def log_line(metrics: dict) -> str:
    """The metrics a person reads while a run trains, on one line."""
    parts = [f"step {metrics['step']}", f"loss {metrics['loss']:.4f}"]
    parts += [f"{k.removeprefix('loss/')} {v:.3f}" for k, v in metrics.items() if k.startswith("loss/")]
    parts += [f"{metrics['samples_per_s']:.1f} samples/s", f"data wait {100 * metrics['data_wait_share']:.1f}%"]
    if metrics.get("grad_norm") is not None:
        parts.append(f"grad norm {metrics['grad_norm']:.3f}")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if "val/loss" in metrics:
        parts.append(f"val {metrics['val/loss']:.4f}")
    return " | ".join(parts)
