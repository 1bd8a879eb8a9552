"""A training run's metric logs: `metrics.jsonl` (one JSON object per logged step) and TensorBoard
events, both under the run directory whether it is local or on s3://.

Only rank 0 writes them. For a local target it appends to the file and writes the events in
place. For an s3:// target it writes both in a local staging directory and uploads them, each
file whole with an atomic write, at every checkpoint, every `log.upload_every_s` seconds and at
the end. It first downloads the run's `metrics.jsonl`, so a resumed run (or a worker group that Ray
Train restarted) appends to the lines already uploaded rather than replacing them; its TensorBoard
event file is a new one beside those of earlier attempts (TensorBoard reads every file in the
directory). Lines written after the last upload of a killed worker are lost with it, but the
restart from the last checkpoint (uploads happen at each one) logs those steps again.

In both cases the steps of a restarted run repeat those logged after its checkpoint; readers that
want one value per step keep the last (`last_per_step`).

    >>> run_dir = tempfile.mkdtemp()  # or s3://bucket/train/NAME
    >>> logs = RunLogs(metrics_log=metrics_path(run_dir), tensorboard_dir=st.join(run_dir, "tensorboard"))
    >>> logs.write({"step": 10, "loss": 0.5}, upload=True)
    >>> logs.close()
    >>> read_metrics(run_dir, st.StorageConfig())
    [{'step': 10, 'loss': 0.5}]
"""

import json
import os
import shutil
import tempfile
import time
import uuid

from omniflow import storage as st

METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"


def metrics_path(run_dir: str) -> str:
    return st.join(run_dir, METRICS_FILE)


def read_metrics(run_dir: str, storage: st.StorageConfig) -> list[dict]:
    """The run's logged metrics in the order they were written; [] when it has none yet. A last line
    still being written (no newline yet) is left out."""
    path = metrics_path(run_dir)
    if not st.exists(path, storage):
        return []
    lines = st.read_bytes(path, storage).decode().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def last_per_step(rows: list[dict]) -> list[dict]:
    """One row per step, the last one logged (a restarted run logs the steps after its checkpoint
    again), in step order."""
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


class RunLogs:
    """Rank 0's writer of `metrics_log` and of TensorBoard events in `tensorboard_dir` (None: no
    TensorBoard); either may be local or s3://."""

    def __init__(self, *, metrics_log: str, tensorboard_dir: str | None,
                 storage: st.StorageConfig | None = None, upload_every_s: float = 60.0):
        self.storage, self.upload_every_s = storage or st.StorageConfig(), upload_every_s
        self.metrics_log, self.tensorboard_dir = metrics_log, tensorboard_dir
        self.staged_metrics = st.scheme(metrics_log) != "file"
        self.staged_events = tensorboard_dir is not None and st.scheme(tensorboard_dir) != "file"
        self.staging = tempfile.mkdtemp(prefix="train-logs-") if self.staged_metrics or self.staged_events else None
        self.local_metrics = os.path.join(self.staging, METRICS_FILE) if self.staged_metrics else st.absolute(metrics_log)
        if self.staged_metrics and st.exists(metrics_log, self.storage):
            with open(self.local_metrics, "wb") as f:  # append to what earlier attempts uploaded
                f.write(st.read_bytes(metrics_log, self.storage))
        self.local_events = None
        if tensorboard_dir is not None:
            self.local_events = os.path.join(self.staging, TENSORBOARD_DIR) if self.staged_events else st.absolute(tensorboard_dir)
        self.writer = None
        if self.local_events is not None:
            from tensorboardX import SummaryWriter

            # a unique suffix: two attempts in the same second on one host must not share a file name
            self.writer = SummaryWriter(self.local_events, filename_suffix=f".{uuid.uuid4().hex[:8]}")
        self.uploaded_at = time.monotonic()

    def write(self, metrics: dict, *, upload: bool = False) -> None:
        """Log one report (it must hold `step`); an s3:// copy is uploaded when `upload` or when the
        last upload is `upload_every_s` old."""
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, metrics["step"])
            self.writer.flush()
        os.makedirs(os.path.dirname(self.local_metrics), exist_ok=True)
        with open(self.local_metrics, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if upload or time.monotonic() - self.uploaded_at >= self.upload_every_s:
            self.upload()

    def upload(self) -> None:
        """Copy the staged files to their s3:// targets (nothing to do for local ones)."""
        if self.staged_metrics and os.path.exists(self.local_metrics):
            with open(self.local_metrics, "rb") as f:
                st.write_bytes_atomic(self.metrics_log, f.read(), self.storage)
        if self.staged_events and os.path.isdir(self.local_events):
            st.upload_dir(self.local_events, self.tensorboard_dir, self.storage)
        self.uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.upload()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
