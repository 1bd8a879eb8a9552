"""Any-to-any quality on ShapesWorld: does each generated output carry the concept it was asked for?

For each task, `samples` held-out scenes (`make_records` with a seed no training source uses: new
layouts, sizes, wordings, detunes and timings of the concepts) give the inputs; the model generates
the targets with fresh sampling seeds; the checkers read each output back (`read_image`,
`read_caption`, `read_audio`) and compare with the scene's concept. A sample is right when colour
and shape both are; colour and shape accuracy are reported separately, with the share of outputs
the checkers could not read at all.

    >>> pipe = AnyToAny.load("runs/demo/model")
    >>> report = evaluate(pipe, QualityConfig(samples=200))
    >>> report["tasks"]["t2i"]["both"]     # share of t2i outputs with colour and shape right
    >>> report["below_goal"]               # tasks under `config.goal`
"""

import io
import time
from collections.abc import Sequence

import numpy as np
import soundfile
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from omniflow.inference import INPUT_FIELDS, AnyToAny, InputPreparer, Prepared, SamplingParams
from omniflow.modality import Modality
from omniflow.tasks import get_task
from shapesworld.checkers import concept_accuracy, read_audio, read_caption, read_image
from shapesworld.concepts import Concept
from shapesworld.defects import make_records

EVAL_TASKS = ("t2i", "i2t", "t2a", "a2t", "i2a", "a2i", "at2i")
HELD_OUT_SEED = 1_000_003  # a scene seed no ShapesWorld source config uses
RECORD_FIELDS = {Modality.TEXT: "caption", Modality.IMAGE: "image", Modality.AUDIO: "audio"}


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: tuple[str, ...] = EVAL_TASKS
    samples: int = Field(200, ge=1, description="per task")
    scene_seed: int = Field(HELD_OUT_SEED, description="seed of the held-out scenes (inputs and truth)")
    sampling_seed: int = Field(0, ge=0, description="sample i is drawn with seed sampling_seed + i")
    steps: int = Field(10, ge=1, description="sampler steps (10, 20 and 40 score alike on the toy model)")
    shift: float = Field(3.0, gt=0)
    guidance: float = Field(2.0, ge=0, description="one CFG weight for every conditioning modality")
    batch_size: int = Field(100, ge=1, description="samples per sampler call")
    goal: float = Field(0.9, ge=0, le=1, description="the `both` share a task must reach to count as learnt")
    concepts: tuple[str, ...] | None = Field(
        None, description="draw the held-out scenes from these colour-shape pairs only ('red circle', ...), "
                          "e.g. the held-out side of `split_concepts`; default: every pair")


def read_concepts(modality: Modality, outputs: Sequence, sample_rate: int | None = None):
    """The checkers' reading of generated outputs (PNG bytes, WAV bytes or captions)."""
    if modality == Modality.TEXT:
        return read_caption(list(outputs))
    if modality == Modality.IMAGE:
        return read_image([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in outputs])
    waves = [soundfile.read(io.BytesIO(wav), dtype="float32")[0] for wav in outputs]
    rate = sample_rate or soundfile.info(io.BytesIO(outputs[0])).samplerate
    return read_audio(waves, rate)


def evaluate(pipe: AnyToAny, config: QualityConfig | None = None, *, log=print) -> dict:
    """Accuracy per task and target modality, in the layout of the demo's `metrics.json`."""
    config = config or QualityConfig()
    pairs = [Concept(*name.split(" ", 1)) for name in config.concepts] if config.concepts else None
    records = make_records(config.samples, seed=config.scene_seed, pairs=pairs)
    truth = [Concept(r["colour"], r["shape"]) for r in records]
    prepare = InputPreparer(pipe.info["codecs"])
    params = SamplingParams(steps=config.steps, shift=config.shift, guidance=config.guidance)
    results = {}
    for name in config.tasks:
        task = get_task(name)
        start = time.perf_counter()
        requests = [
            Prepared(task=name, params=params, seed=config.sampling_seed + i,
                     inputs=prepare(**{INPUT_FIELDS[m]: r[RECORD_FIELDS[m]] for m in task.conditions}))
            for i, r in enumerate(records)
        ]
        outputs = []
        for i in range(0, len(requests), config.batch_size):
            outputs += pipe.run(requests[i:i + config.batch_size], decode_alone=False)
        per_target = {}
        for m in task.targets:
            generated = [getattr(o, INPUT_FIELDS[m])[0] for o in outputs]
            per_target[m.value] = concept_accuracy(read_concepts(m, generated), truth)
        # a task with one target reports that target's accuracy at its top level
        summary = per_target[task.targets[0].value] if len(task.targets) == 1 else {}
        results[name] = {**summary, "targets": per_target, "samples": len(records),
                         "seconds": round(time.perf_counter() - start, 1)}
        log(f"{name}: both {summary.get('both', float('nan')):.3f} colour {summary.get('colour', float('nan')):.3f} "
            f"shape {summary.get('shape', float('nan')):.3f} ({results[name]['seconds']} s)")
    short = [name for name, r in results.items() if r.get("both", 1.0) < config.goal]
    return {"config": config.model_dump(mode="json"), "tasks": results,
            "min_both": min(r["both"] for r in results.values() if "both" in r), "below_goal": short}


def check_outputs(modality: str, outputs: Sequence, captions: Sequence[str]) -> list[dict[str, bool]]:
    """The evaluation job's concept checker (`metrics.checkers: shapesworld`): per generated output
    (PNG bytes, WAV bytes or a caption), whether its colour and shape read back as its row's
    caption names them. An output the checkers cannot read is wrong on both."""
    got, want = read_concepts(Modality(modality), outputs), read_caption(list(captions))
    return [{"colour": g is not None and g == w, "shape": gs is not None and gs == ws}
            for g, w, gs, ws in zip(got.colours, want.colours, got.shapes, want.shapes)]
