"""Evaluate a model directory on benchmark sets: generate, measure, report.

    python -m jobs.evaluate --config configs/evaluate_shapesworld.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.evaluate --config FILE.yaml output=s3://bucket/eval

For every benchmark set (read by the project's sources: Parquet, WebDataset, folders; local or
S3) and each of its tasks, one Ray Data pipeline reads the rows, gives each its seed (a hash of
`sampling.seed`, the task and the row's key) and generates the task's target in actor stages that
hold the model (`generation`: actors, CPUs / GPUs each, samples per sampler call). The samples
are committed as whole Parquet parts; a rerun skips every key already written, so a killed job
continues where it stopped, and the same config regenerates the same outputs. Then actor stages
holding the feature extractors (`scoring`) score every sample: FID, CLIP score and optionally
ImageReward for images, FAD and CLAP score for audio, CIDEr-D / BLEU-4 / ROUGE-L for captions
(against every caption of the sample's medium), and a concept checker where one is named (the toy
domain's). The benchmark's own statistics for FID and FAD are computed once per
feature extractor and cached (`metrics.reference_cache`, default beside the benchmark's files).

Output layout under `output`:
    <benchmark>/<task>/samples/part-*.parquet  `pipelines.schema.EVAL_SAMPLE` rows (media in, generated out)
    <benchmark>/<task>/rejects/part-*.parquet  rows that could not be evaluated, with why
    <benchmark>/<task>/scores.parquet          `pipelines.schema.EVAL_SCORE`: per-sample scores
    <benchmark>/<task>/made_from.json          the model (as listed), sampling and source the samples
                                               come from: a rerun with others is refused
    <benchmark>/<task>/generated.json          the parts a finished generation left (a rerun with them
                                               all in place generates nothing)
    <benchmark>/<task>/references.parquet      for a text target: the rows that are one sample (the same
                                               condition medium), whose captions are all its references
    <benchmark>/<task>/scored.json             the task's metrics, reused by a rerun while its sample
                                               parts and metrics config are the same
    metrics.json                               per benchmark and task: metrics, counts; seeds, config, versions
    report.html                                the metrics table, and each task's best and worst samples
    manifest.json                              `pipelines.manifest.EvaluateManifest`, written last
"""

import json
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.common import Progress, dumps, job_main
from omniflow import storage as st
from omniflow.config import ConfigError, config_hash
from omniflow.metrics import FrechetDistance, caption_metrics, load_statistics, save_statistics
from omniflow.modality import Modality
from omniflow.tasks import get_task
from pipelines.evaluation.config import BenchmarkConfig, EvaluateConfig, pairs
from pipelines.evaluation.generate import STAGE, GenerateStage, start_rows
from pipelines.evaluation.paper import beside_paper
from pipelines.evaluation.references import CaptionGroups, caption_groups
from pipelines.evaluation.report import RANKING, write_report
from pipelines.evaluation.scoring import FEATURES, ReferenceStage, ScoreStage, extractor_id
from pipelines.manifest import EvaluateManifest, package_versions, write_manifest
from pipelines.parts import KeptRejectedSink, index_parts, read_parts, read_parts_dataset
from pipelines.runtime import init_ray
from pipelines.schema import EVAL_SAMPLE, EVAL_SCORE, SCHEMA_VERSION, conform
from pipelines.sources import read_sources

METRICS_FILE = "metrics.json"
IDENTITY_FILE = "made_from.json"  # beside a task's samples: what they were made from
SCORES_FILE = "scores.parquet"
SCORED_FILE = "scored.json"  # the task's metrics, and the sample parts and metrics config they are of
GENERATED_FILE = "generated.json"  # the parts a finished generation left
REPORT_FILE = "report.html"
REFERENCES_FILE = "references.parquet"  # rows captioned as one sample, for text targets


def task_dir(config: EvaluateConfig, bench: BenchmarkConfig, task: str) -> str:
    return st.join(config.output, bench.name, task)


def samples_sink(config: EvaluateConfig, bench: BenchmarkConfig, task: str) -> KeptRejectedSink:
    """Where a task's samples go: `samples/` and `rejects/` under its directory."""
    return KeptRejectedSink(task_dir(config, bench, task), "samples", EVAL_SAMPLE, config.storage,
                            rows_per_part=config.rows_per_part)


# ---- generation -----------------------------------------------------------------------------


def samples_identity(config: EvaluateConfig, bench: BenchmarkConfig) -> dict[str, Any]:
    """What a task's samples were made from: the model directory as listed (its files' names,
    sizes and stamps), the sampling settings and the benchmark's source."""
    return {"model": config.model, "model_listing": st.listing_digest(config.model, config.storage),
            "sampling": config.sampling.model_dump(mode="json"), "source": bench.source.model_dump(mode="json"),
            "references": bench.references}


def check_identity(config: EvaluateConfig, bench: BenchmarkConfig, task: str) -> None:
    """Refuse to resume into samples made from another model, sampling or source; record the
    identity of a new task directory."""
    path = st.join(task_dir(config, bench, task), IDENTITY_FILE)
    want = samples_identity(config, bench)
    if st.exists(path, config.storage):
        have = json.loads(st.read_bytes(path, config.storage))
        changed = sorted(k for k in want if have.get(k) != want[k])
        if changed:
            raise ConfigError(f"{task_dir(config, bench, task)} holds samples made with another {', '.join(changed)}: "
                              f"give a new output, or remove it to generate again")
        return
    st.write_bytes_atomic(path, dumps(want), config.storage)


def generate(config: EvaluateConfig, bench: BenchmarkConfig, task: str, progress: Progress) -> None:
    """Generate every row of `bench` for `task` that is not yet in its samples or rejects."""
    check_identity(config, bench, task)
    sink = samples_sink(config, bench, task)
    finished = st.join(task_dir(config, bench, task), GENERATED_FILE)
    if st.exists(finished, config.storage) and json.loads(st.read_bytes(finished, config.storage)) == _listing(sink):
        progress.log(f"{bench.name}/{task}: every row was generated earlier")
        return
    done = sink.done_keys()
    if done:
        progress.log(f"{bench.name}/{task}: resuming, {len(done)} rows already written")
    merged = references(config, bench, task, progress).merged
    ds = read_sources([bench.source], config.storage, skip_keys=done | merged, num_cpus=config.io_num_cpus)
    ds = ds.map_batches(start_rows, fn_kwargs={"task": task, "base_seed": config.sampling.seed},
                        batch_format="pyarrow", num_cpus=config.io_num_cpus)
    ds = ds.map_batches(GenerateStage, **GenerateStage.map_batches_kwargs(config, task))
    ds.write_datasink(sink, ray_remote_args={"num_cpus": config.io_num_cpus})
    sink.deduplicate()
    st.write_bytes_atomic(finished, dumps(_listing(sink)), config.storage)


def references(config: EvaluateConfig, bench: BenchmarkConfig, task: str, progress: Progress) -> CaptionGroups:
    """A text-generating task's samples that stand for several rows, and their references (none
    for other tasks, or with `references: row`)."""
    spec = get_task(task)
    if spec.targets != (Modality.TEXT,) or bench.references == "row" or len(spec.conditions) != 1:
        return CaptionGroups()
    path = st.join(task_dir(config, bench, task), REFERENCES_FILE)
    fresh = not st.exists(path, config.storage)
    if fresh:
        progress.log(f"{bench.name}/{task}: grouping rows by their {spec.conditions[0].value}")
    rows = read_sources([bench.source], config.storage, num_cpus=config.io_num_cpus)
    groups = caption_groups(rows, spec.conditions[0], path, config.storage, num_cpus=config.io_num_cpus)
    if fresh and groups.merged:
        progress.log(f"{bench.name}/{task}: {len(groups.merged) + len(groups.references)} rows are "
                     f"{len(groups.references)} samples with several references")
    return groups


def _listing(sink: KeptRejectedSink) -> dict[str, list[str]]:
    """The committed parts of a task, by output: a finished generation is recorded as the parts it
    left, so a part lost since is noticed (and its rows generated again)."""
    return {name: sorted(parts) for name, parts in sink.parts().items()}


# ---- scoring --------------------------------------------------------------------------------


def reference_cache(config: EvaluateConfig, bench: BenchmarkConfig) -> str:
    """Where a benchmark's feature statistics are cached: `metrics.reference_cache`, else beside
    its files, else (a generated source) under the output."""
    if config.metrics.reference_cache:
        return st.join(config.metrics.reference_cache, bench.name)
    path = getattr(bench.source, "path", None)
    if path:
        return st.join(st.absolute(path).rstrip("/").rsplit("/", 1)[0], "omniflow_reference", bench.name)
    return st.join(config.output, "reference", bench.name)


def reference_statistics(config: EvaluateConfig, bench: BenchmarkConfig, modality: Modality,
                         progress: Progress) -> dict[str, np.ndarray]:
    """The benchmark's own feature statistics for `modality`, from the cache or computed (and
    cached) with one pass of the scoring actors over its rows."""
    extractor = extractor_id(config.metrics, modality)
    source = config_hash(bench.source)  # another source under the same benchmark name gets its own file
    path = st.join(reference_cache(config, bench), f"{modality.value}-{extractor}-{source}.npz")
    if st.exists(path, config.storage):
        progress.log(f"{bench.name}: {modality.value} reference statistics from {path}")
        return load_statistics(path, extractor=extractor, storage=config.storage)
    progress.log(f"{bench.name}: computing {modality.value} reference statistics ({extractor})")
    ds = read_sources([bench.source], config.storage, num_cpus=config.io_num_cpus)
    kwargs = config.scoring.map_batches_kwargs({
        "metrics": config.metrics.model_dump(mode="json"), "modality": modality.value,
        "device": config.scoring.device, "storage": config.storage})
    ds = ds.map_batches(ReferenceStage, **{**kwargs, "udf_modifying_row_count": True})
    frechet = None
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if block.num_rows:
            features = np.stack(block.column(FEATURES).to_numpy(zero_copy_only=False))
            frechet = frechet or FrechetDistance(num_features=features.shape[1])
            frechet.add(features, real=True)
    if frechet is None:
        raise ConfigError(f"benchmarks: {bench.name!r} has no readable {modality.value} to compare the generated ones with")
    stats = frechet.real_statistics()
    save_statistics(path, stats, extractor=extractor, storage=config.storage)
    return stats


def score(config: EvaluateConfig, bench: BenchmarkConfig, task: str, progress: Progress) -> tuple[dict, pa.Table]:
    """A task's metrics, and its per-sample scores (written to its `scores.parquet` in the
    `EVAL_SCORE` layout; returned with the columns that rank samples for the report)."""
    spec = get_task(task)
    (target,) = spec.targets
    parts = samples_sink(config, bench, task).parts()
    rejected = index_parts(parts["rejects"], config.storage).rows.num_rows
    if not parts["samples"]:
        progress.log(f"{bench.name}/{task}: no sample to score ({rejected} rejected: {task_dir(config, bench, task)}/rejects)")
        return {"samples": 0, "rejected": rejected}, _scores_table(pa.table({}))
    scored_path = st.join(task_dir(config, bench, task), SCORED_FILE)
    scored_of = {"parts": {k: sorted(v) for k, v in parts.items()}, "metrics": config.metrics.model_dump(mode="json")}
    if st.exists(scored_path, config.storage):
        saved = json.loads(st.read_bytes(scored_path, config.storage))
        if saved["of"] == scored_of:
            progress.log(f"{bench.name}/{task}: scores of these samples from {scored_path}")
            table = read_parts([st.join(task_dir(config, bench, task), SCORES_FILE)], config.storage)
            return saved["result"], _with_checks(table)[0] if "checks" in table.column_names else table
    index = index_parts(parts["samples"], config.storage)
    ds = read_parts_dataset(index.reads(), config.storage, schema=EVAL_SAMPLE, rows_per_block=config.scoring.batch_size,
                            num_cpus=config.io_num_cpus)
    ds = ds.map_batches(ScoreStage, **config.scoring.map_batches_kwargs({
        "metrics": config.metrics.model_dump(mode="json"), "task": task, "device": config.scoring.device,
        "storage": config.storage}))
    tables, features = [], []
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if FEATURES in block.column_names:
            features += block.column(FEATURES).to_numpy(zero_copy_only=False).tolist()
            block = block.drop_columns([FEATURES])
        tables.append(block)
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({"key": pa.array([], pa.string())})
    result: dict[str, Any] = {"samples": table.num_rows, "rejected": rejected}
    if features:
        stats = reference_statistics(config, bench, target, progress)
        frechet = FrechetDistance(num_features=len(features[0]))
        frechet.load_real_statistics(stats)
        frechet.add(np.asarray(features, np.float32), real=False)
        result["fid" if target == Modality.IMAGE else "fad"] = frechet.compute()
        result["reference_samples"] = int(stats["count"])
    if target == Modality.TEXT and config.metrics.captions:
        table = _with_caption_scores(config, parts["samples"], table, result,
                                     references(config, bench, task, progress))
    for name in ("clip_score", "image_reward", "clap_score"):
        if name in table.column_names:
            result[name] = float(np.mean(table.column(name).to_numpy()))
    if "checks" in table.column_names:
        table, checks = _with_checks(table)
        result |= checks
    st.write_parquet_atomic(_scores_table(table), st.join(task_dir(config, bench, task), SCORES_FILE), config.storage)
    st.write_bytes_atomic(scored_path, dumps({"of": scored_of, "result": result}), config.storage)
    progress.log(f"{bench.name}/{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return result, table


def _with_caption_scores(config: EvaluateConfig, parts: list[str], table: pa.Table, result: dict,
                         groups: CaptionGroups) -> pa.Table:
    samples = read_parts(parts, config.storage, ["key", "caption", "generated_caption"])
    by_key = dict(zip(samples.column("key").to_pylist(), zip(samples.column("caption").to_pylist(),
                                                           samples.column("generated_caption").to_pylist())))
    keys = table.column("key").to_pylist()
    refs = [groups.of(k, by_key[k][0]) for k in keys]
    scores = caption_metrics([by_key[k][1] or "" for k in keys], refs)
    result |= {"cider": scores.cider, "bleu4": scores.bleu[3], "rouge_l": scores.rouge_l,
               "references_per_sample": float(np.mean([len(r) for r in refs])) if refs else 0.0}
    table = table.append_column("cider", pa.array(scores.cider_per_sample, pa.float32()))
    table = table.append_column("bleu4", pa.array(scores.bleu_per_sample[:, 3], pa.float32()))
    return table.append_column("rouge_l", pa.array(scores.rouge_l_per_sample, pa.float32()))


def _with_checks(table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
    """The concept checker's shares right per attribute and for all of them (`checks_all`)."""
    checks = [json.loads(c) if c else {} for c in table.column("checks").to_pylist()]
    every = sorted({k for c in checks for k in c})
    shares = {f"checks_{k}": float(np.mean([c.get(k, False) for c in checks])) for k in every}
    right = [all(c.get(k, False) for k in every) for c in checks]
    shares["checks_all"] = float(np.mean(right)) if right else float("nan")
    return table.append_column("checks_all", pa.array(right, pa.bool_())), shares


def _scores_table(table: pa.Table) -> pa.Table:
    n = table.num_rows if table.num_columns else 0
    columns = {f.name: table.column(f.name) if f.name in table.column_names else pa.nulls(n, f.type) for f in EVAL_SCORE}
    columns["schema_version"] = pa.array(np.full(n, SCHEMA_VERSION, np.int16))
    return conform(pa.table(columns), EVAL_SCORE)


# ---- report ---------------------------------------------------------------------------------


def shown_samples(config: EvaluateConfig, bench: BenchmarkConfig, task: str,
                  ranking: pa.Table) -> dict[str, Any] | None:
    """The task's best and worst `report_samples` rows by its ranking score, with their media."""
    name = next((n for n in RANKING if n in ranking.column_names and ranking.column(n).null_count < ranking.num_rows),
                None)
    if name is None or not config.report_samples or ranking.num_rows == 0:
        return None
    values = np.asarray(ranking.column(name).to_pylist(), dtype=float)
    order = np.argsort(-values, kind="stable")
    keys = ranking.column("key").to_pylist()
    k = min(config.report_samples, len(order))
    best, worst = [keys[i] for i in order[:k]], [keys[i] for i in order[::-1][:k]]
    parts = samples_sink(config, bench, task).parts()["samples"]
    rows = {r["key"]: r for r in read_parts(parts, config.storage, keys=best + worst).to_pylist()}
    score_of = dict(zip(keys, values.tolist()))
    pick = lambda chosen: [{**rows[key], name: score_of[key]} for key in chosen if key in rows]
    return {"score": name, "best": pick(best), "worst": pick(worst)}


def run(config: EvaluateConfig) -> dict:
    """Generate, score and report every (benchmark, task); returns the manifest."""
    progress = Progress("evaluate")
    init_ray(config.ray.num_cpus)
    started = time.perf_counter()
    for bench, task in pairs(config):
        progress.phase(f"generating {bench.name}/{task}")
        generate(config, bench, task, progress)
    generate_s = time.perf_counter() - started
    results: dict[str, dict[str, Any]] = {}
    shown = {}
    for bench, task in pairs(config):
        progress.phase(f"scoring {bench.name}/{task}")
        result, table = score(config, bench, task, progress)
        results.setdefault(bench.name, {})[task] = result
        shown[(bench.name, task)] = shown_samples(config, bench, task, table)
    timings = progress.done()
    metrics = {
        "model": config.model,
        "summary": f"{sum(r['samples'] for b in results.values() for r in b.values())} samples over "
                   f"{len(list(pairs(config)))} benchmark tasks; seed {config.sampling.seed}, "
                   f"{config.sampling.steps} steps, guidance {config.sampling.guidance}",
        "benchmarks": results,
        "beside_paper": beside_paper(results, {b.name: b.paper for b in config.benchmarks}),
        "sampling": config.sampling.model_dump(mode="json"),
        "seed_rule": "sample seed = sha256(f'{sampling.seed}/{task}/{key}')[:8] >> 1",
        "stage": STAGE,
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "timings": {**timings, "generate_s": round(generate_s, 1)},
        "schema_version": SCHEMA_VERSION,
    }
    outputs = {"metrics": st.join(config.output, METRICS_FILE), "report": st.join(config.output, REPORT_FILE)}
    outputs |= {f"{bench.name}/{task}": task_dir(config, bench, task) for bench, task in pairs(config)}
    st.write_bytes_atomic(outputs["metrics"], dumps(metrics), config.storage)
    st.write_bytes_atomic(outputs["report"], write_report(metrics, shown).encode(), config.storage)
    progress.log(f"metrics at {outputs['metrics']}, report at {outputs['report']}")
    manifest = EvaluateManifest.of(config, timings, model=config.model, benchmarks=results,
                                   beside_paper=metrics["beside_paper"], outputs=outputs)
    return write_manifest(config.output, manifest, config.storage)


def main(argv: list[str] | None = None) -> int:
    return job_main(EvaluateConfig, run, argv, prog="python -m jobs.evaluate", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
