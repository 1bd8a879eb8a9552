"""Generation for evaluation on Ray Data: benchmark rows in, `EVAL_SAMPLE` rows out.

`start_rows` turns read rows into evaluation rows of one task: a row that lacks one of the task's
conditions, or a reference for its target, or that the source could not read, carries its reject
reason. `GenerateStage` is the actor stage that holds the model (`AnyToAny`, loaded once per
actor from a local or `s3://` model directory): it prepares each live row's conditions (a bad
medium rejects that row, with the reason) and samples the rest in calls of the stage's batch
size, each sample from its own seed, so its output does not depend on its batch.

    >>> ds = read_sources([benchmark.source], storage).map_batches(start_rows, fn_kwargs=...)
    >>> ds = ds.map_batches(GenerateStage, **resources.map_batches_kwargs({...}))
"""

from typing import Any

import numpy as np
import pyarrow as pa

from omniflow import storage as st
from omniflow.codecs.media import MediaError
from omniflow.inference import INPUT_FIELDS, AnyToAny, InputPreparer, Prepared, SamplingParams
from omniflow.model_dir import fetch_model_dir
from omniflow.tasks import get_task
from pipelines.generators.base import row_seed
from pipelines.resources import resolve_device
from pipelines.schema import (
    EVAL_SAMPLE,
    MEDIA_COLUMN,
    READ_SAMPLE,
    REJECT_REASON,
    REJECT_STAGE,
    SCHEMA_VERSION,
    conform,
)

STAGE = "evaluate"
# An evaluation row while it is alive: the reject columns stay null.
EVAL_WORK = pa.schema(list(EVAL_SAMPLE) + [REJECT_STAGE, REJECT_REASON])
GENERATED_COLUMN = {m: f"generated_{column}" for m, column in MEDIA_COLUMN.items()}


def sample_seed(base_seed: int, task: str, key: str) -> int:
    """A sample's seed: a hash of the run's seed, the task and the row's key."""
    return row_seed(base_seed, f"{task}/{key}")


def start_rows(batch: pa.Table, *, task: str, base_seed: int) -> pa.Table:
    """`READ_SAMPLE` rows -> `EVAL_WORK` rows of `task`, with their seeds; a row that cannot take
    part gets its reason."""
    batch = conform(batch, READ_SAMPLE)
    spec = get_task(task)
    n = batch.num_rows
    reasons = batch.column(REJECT_REASON.name).to_pylist()
    stages = batch.column(REJECT_STAGE.name).to_pylist()
    for m in (*spec.conditions, *spec.targets):
        column = MEDIA_COLUMN[m]
        role = "condition" if m in spec.conditions else "reference"
        for i, value in enumerate(batch.column(column).to_pylist()):
            blank = value is None or (isinstance(value, str) and not value.strip())
            if blank and reasons[i] is None:
                reasons[i], stages[i] = f"no {column} (the {role} of {task})", STAGE
    keys = batch.column("key").to_pylist()
    columns = {name: batch.column(name) for name in batch.column_names}
    columns |= {
        "task": pa.array([task] * n, pa.string()),
        "seed": pa.array([sample_seed(base_seed, task, k) for k in keys], pa.int64()),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int16)),
        REJECT_REASON.name: pa.array(reasons, pa.string()),
        REJECT_STAGE.name: pa.array(stages, pa.string()),
    }
    return conform(pa.table(columns), EVAL_WORK)


class GenerateStage:
    """Ray Data actor stage: the model, loaded once per actor, generates each live row's target."""

    def __init__(self, model: str, storage: st.StorageConfig, task: str, sampling: dict[str, Any], device: str,
                 batch_size: int):
        self.model, self.storage, self.sampling, self.device = model, storage, sampling, device
        self.task = get_task(task)
        self.params = SamplingParams(steps=sampling["steps"], shift=sampling["shift"], guidance=sampling["guidance"])
        self.batch_size = batch_size
        self._loaded: tuple[AnyToAny, InputPreparer] | None = None

    def _model(self) -> tuple[AnyToAny, InputPreparer]:
        """The model and its input preparer, loaded for the first batch with a row to generate (a
        set whose rows all fail their checks never loads it)."""
        if self._loaded is None:
            pipe = AnyToAny.load(fetch_model_dir(self.model, self.storage), device=str(resolve_device(self.device)),
                                 dtype=self.sampling["dtype"], conventions=self.sampling["conventions"])
            why = pipe.unsupported(self.task)
            if why:
                raise ValueError(f"{self.model} cannot run {self.task.name}: {why}")
            self._loaded = pipe, InputPreparer(pipe.info["codecs"])
        return self._loaded

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = conform(batch, EVAL_WORK)
        reasons = batch.column(REJECT_REASON.name).to_pylist()
        stages = batch.column(REJECT_STAGE.name).to_pylist()
        media = {m: batch.column(MEDIA_COLUMN[m]).to_pylist() for m in self.task.conditions}
        seeds = batch.column("seed").to_pylist()
        if all(r is not None for r in reasons):
            return batch
        pipe, prepare = self._model()
        live, requests = [], []
        for i in range(batch.num_rows):
            if reasons[i] is not None:
                continue
            try:
                inputs = prepare(**{INPUT_FIELDS[m]: media[m][i] for m in self.task.conditions})
            except MediaError as err:
                reasons[i], stages[i] = str(err), STAGE
                continue
            live.append(i)
            requests.append(Prepared(task=self.task.name, inputs=inputs, params=self.params, seed=seeds[i]))
        (target,) = self.task.targets
        generated: list[Any] = [None] * batch.num_rows
        for start in range(0, len(requests), self.batch_size):
            outputs = pipe.run(requests[start:start + self.batch_size], decode_alone=False)
            for i, out in zip(live[start:start + self.batch_size], outputs):
                generated[i] = getattr(out, INPUT_FIELDS[target])[0]
        columns = {name: batch.column(name) for name in batch.column_names}
        columns[GENERATED_COLUMN[target]] = pa.array(generated, EVAL_WORK.field(GENERATED_COLUMN[target]).type)
        columns[REJECT_REASON.name] = pa.array(reasons, pa.string())
        columns[REJECT_STAGE.name] = pa.array(stages, pa.string())
        return conform(pa.table(columns), EVAL_WORK)

    @classmethod
    def map_batches_kwargs(cls, config, task: str) -> dict[str, Any]:
        """`Dataset.map_batches(GenerateStage, ...)` arguments for an `EvaluateConfig` and a task."""
        resources = config.generation
        return resources.map_batches_kwargs({
            "model": config.model, "storage": config.storage, "task": task,
            "sampling": config.sampling.model_dump(mode="json"), "device": resources.device,
            "batch_size": resources.batch_size,
        })
