"""The OmniFlow paper's published results (Li et al., CVPR 2025, arXiv 2412.01169v2), to print a
run's metrics beside them.

A benchmark set says which of the paper's benchmarks it stands for (`BenchmarkConfig.paper`).
Values are as the paper prints them; `scale` turns this job's value into the paper's unit
(CIDEr is printed x 100; the paper's CLAP scores are cosines, where this job's are 100 x cosine).
Where the paper names no implementation (FID's, FAD's embedding, the CLIP and CLAP checkpoints),
a run's number is comparable only as far as its extractors match the paper's: see
docs/evaluate.md.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# coco: text-to-image on MSCOCO-30K, captioning on the Karpathy test split
PaperBenchmark = Literal["coco", "audiocaps", "vggsound"]


@dataclass(frozen=True)
class PaperResult:
    benchmark: PaperBenchmark
    task: str
    metric: str  # this job's metric name
    value: float  # OmniFlow's, as printed
    scale: float  # this job's value * scale is in the printed unit
    source: str


TABLE_1 = "Table 1, text-to-image on MSCOCO-30K"
TABLE_3 = "Table 3, text-to-audio on AudioCaps"
TABLE_6 = "Table 6, X-to-text on AudioCaps and COCO Captions (Karpathy test)"
TABLE_7 = "Table 7 (v2), image-to-audio on VGGSound"

PAPER: tuple[PaperResult, ...] = (
    PaperResult("coco", "t2i", "fid", 13.40, 1.0, TABLE_1),
    PaperResult("coco", "t2i", "clip_score", 31.54, 1.0, TABLE_1),
    PaperResult("audiocaps", "t2a", "fad", 1.75, 1.0, TABLE_3),
    PaperResult("audiocaps", "t2a", "clap_score", 0.183, 0.01, TABLE_3),
    PaperResult("audiocaps", "a2t", "clap_score", 0.254, 0.01, TABLE_6),
    PaperResult("audiocaps", "a2t", "cider", 48.0, 100.0, TABLE_6),
    PaperResult("coco", "i2t", "clip_score", 26.8, 1.0, TABLE_6),
    PaperResult("coco", "i2t", "cider", 47.3, 100.0, TABLE_6),
    PaperResult("vggsound", "i2a", "fad", 1.83, 1.0, TABLE_7),
)


def beside_paper(benchmarks: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 paper_of: Mapping[str, PaperBenchmark | None]) -> list[dict[str, Any]]:
    """One row per published number a run measured: benchmark, task, metric, this run's value in
    the paper's unit, the paper's, and the table it is from."""
    rows = []
    for bench, tasks in benchmarks.items():
        published: Sequence[PaperResult] = [r for r in PAPER if r.benchmark == paper_of.get(bench)]
        for r in published:
            ours = tasks.get(r.task, {}).get(r.metric)
            if ours is None:
                continue
            rows.append({"benchmark": bench, "paper_benchmark": r.benchmark, "task": r.task, "metric": r.metric,
                         "this_run": ours * r.scale, "omniflow_paper": r.value, "source": r.source})
    return rows
