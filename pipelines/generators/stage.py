"""Synthesis on Ray Data: rows in `TRIPLET_SAMPLE` layout plus `reject_reason`, one actor stage per
generator.

`start_rows` turns curated rows into synthesis rows (nothing synthetic yet; a row missing a
modality that is not to be filled is rejected). `GenerateStage` is the callable-class actor stage:
its generator loads once per actor, and each batch goes through `fill_batch`, which generates the
modality for live rows that lack it and passes every other row through. Stages run caption first
(from the image), then image and audio (from the caption).

    >>> import ray
    >>> from pipelines.generators.stage import GenerateStage, start_rows
    >>> from pipelines.generators.config import GeneratorsConfig
    >>> generators = GeneratorsConfig.model_validate({"audio": {"type": "shapesworld"}})
    >>> ds = ray.data.from_arrow(start_rows(curated_table, fill=["audio"]))
    >>> ds = ds.map_batches(GenerateStage, **GenerateStage.map_batches_kwargs("audio", generators.audio, base_seed=0))
"""

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipelines.generators.base import (
    MODALITIES,
    SOURCE_OF,
    Failure,
    Generator,
    ModalityName,
    row_seed,
)
from pipelines.generators.factory import build_generator
from pipelines.schema import CURATED_SAMPLE, REJECT_REASON, TRIPLET_SAMPLE, conform

# A row in synthesis: its reject reason stays null while the row is alive.
SYNTHESIS_SAMPLE = pa.schema(list(TRIPLET_SAMPLE) + [REJECT_REASON])
# Generation order: captions come from images, so they are made before anything reads them.
ORDER: tuple[ModalityName, ...] = ("caption", "image", "audio")


def start_rows(curated: pa.Table, fill: Sequence[ModalityName]) -> pa.Table:
    """Curated rows -> `SYNTHESIS_SAMPLE` rows: flags false, no provenance, and a reject reason for
    rows missing a modality that `fill` leaves out (they cannot be completed)."""
    table = conform(curated, CURATED_SAMPLE)
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    for modality in MODALITIES:
        if modality in fill:
            continue
        for i, valid in enumerate(table.column(modality).is_valid().to_pylist()):
            if not valid and reasons[i] is None:
                reasons[i] = f"no {modality}, and {modality} is not in fill"
    columns = {f.name: table.column(f.name) for f in CURATED_SAMPLE}
    for modality in MODALITIES:
        columns[f"{modality}_synthetic"] = pa.array([False] * n, pa.bool_())
    columns["reject_reason"] = pa.array(reasons, pa.string())
    return conform(pa.table(columns), SYNTHESIS_SAMPLE)


def fill_batch(batch: pa.Table, generator: Generator, base_seed: int) -> pa.Table:
    """Generate `generator.modality` for live rows that lack it; other rows pass through.

    A generated value sets `<modality>_synthetic` and `<modality>_provenance` (with the row's seed,
    `row_seed(base_seed, key)`); a `Failure`, or a row without the source modality, sets
    `reject_reason`.
    """
    modality, source = generator.modality, SOURCE_OF[generator.modality]
    values = batch.column(modality).to_pylist()
    reasons = batch.column(REJECT_REASON.name).to_pylist()
    inputs = batch.column(source).to_pylist()
    keys = batch.column("key").to_pylist()
    rows = []
    for i in range(batch.num_rows):
        if reasons[i] is not None or values[i] is not None:
            continue
        if inputs[i] is None:
            reasons[i] = f"no {modality}, and no {source} to generate it from"
        else:
            rows.append(i)
    seeds = [row_seed(base_seed, keys[i]) for i in rows]
    outputs = generator.generate([inputs[i] for i in rows], seeds) if rows else []
    synthetic = batch.column(f"{modality}_synthetic").to_pylist()
    provenance = batch.column(f"{modality}_provenance").to_pylist()
    for i, seed, output in zip(rows, seeds, outputs):
        if isinstance(output, Failure):
            reasons[i] = f"{modality} generation ({generator.name}) failed: {output.reason}"
        else:
            values[i], synthetic[i], provenance[i] = output, True, generator.provenance(seed)
    updates = {
        modality: values,
        f"{modality}_synthetic": synthetic,
        f"{modality}_provenance": provenance,
        REJECT_REASON.name: reasons,
    }
    columns = {name: batch.column(name) for name in batch.column_names}
    for name, column in updates.items():
        columns[name] = pa.array(column, SYNTHESIS_SAMPLE.field(name).type)
    return conform(pa.table(columns), SYNTHESIS_SAMPLE)


class GenerateStage:
    """Ray Data actor stage: fill one modality with one generator (loaded once per actor).

    The actor gets the generator's settings without the stage's resources, which only the driver
    needs.
    """

    def __init__(self, modality: ModalityName, settings: dict, device: str, base_seed: int):
        self.generator = build_generator(modality, settings, device=device)
        self.base_seed = base_seed

    @classmethod
    def map_batches_kwargs(cls, modality: ModalityName, config: Any, *, base_seed: int) -> dict[str, Any]:
        """`Dataset.map_batches(GenerateStage, ...)` keyword arguments for a generator config of
        `pipelines.generators.config` (its settings and its stage's resources)."""
        settings = config.model_dump(mode="json", exclude={"resources"})
        return config.resources.map_batches_kwargs(
            {"modality": modality, "settings": settings, "device": config.resources.device, "base_seed": base_seed}
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return fill_batch(batch, self.generator, self.base_seed)
