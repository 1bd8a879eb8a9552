"""The whole flow on ShapesWorld on this machine, with tiny models: what `make demo` runs.

    python -m shapesworld.demo                       # writes runs/demo/
    python -m shapesworld.demo --out runs/demo2 data_scale=0.25 steps.stage3=200 quality.samples=50

One local Ray cluster runs every stage, each the job a user runs on a cluster, with the ShapesWorld
configs of `configs/` pointed into the output directory:

    toy CLIP + toy codecs (runs/toy/, cached) -> curate (planted defects) -> synthesize -> encode
    -> train stage 1 (image-text) and stage 2 (text-audio) -> merge -> train stage 3 (any-to-any)
    -> serve the model and query every task over HTTP -> measure quality -> evaluate -> report

A stage whose manifest exists with the same config hash, and whose inputs are the ones it was made
from, is reused, so a rerun (or one after an interruption) redoes only what changed and everything
after it; a stage whose inputs changed starts from an empty output directory (`<out>/lineage.json`
records which toy builds and which run of the stage before it each stage read). Output `<out>/`:
    curated/ triplets/ latents/ train/ merge/   each stage's output and manifest.json
    samples/                                    what the service answered per task (PNG, WAV, TXT)
    eval/                                       the evaluation job's output (metrics.json, report.html)
    metrics.json                                quality per task (colour, shape, both), the evaluation's
                                                metrics, curation counts, training and serving
                                                figures, stage timings
    report.html                                 samples, spectrograms with players, captions, loss
                                                curves, curation histograms and counts
"""

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from jobs.common import Progress, dumps, job_main
from omniflow.config import load_config
from omniflow.tasks import BUILTIN_TASKS
from pipelines.manifest import is_reusable
from pipelines.runtime import RayConfig, init_ray
from shapesworld import checks
from shapesworld.quality import QualityConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOY = "runs/toy/"  # where the configs expect the toy CLIP and codecs


class StageSteps(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage1: int = Field(400, ge=1)
    stage2: int = Field(200, ge=1)
    stage3: int = Field(800, ge=1)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = "runs/demo"
    toy: str = Field("runs/toy", description="where the toy CLIP and codecs are built (once) and read from")
    data_scale: float = Field(0.4, gt=0, le=4, description="multiplies the ShapesWorld sources' sample counts")
    steps: StageSteps = Field(default_factory=StageSteps)
    batch_size: int = Field(64, ge=1)
    train_overrides: list[str] = Field(default_factory=list, description="key=value for every training stage")
    quality: QualityConfig = Field(default_factory=QualityConfig)
    evaluation_samples: int = Field(40, ge=1, description="held-out rows per benchmark set of the evaluation job")
    evaluation_overrides: list[str] = Field(default_factory=list, description="key=value for the evaluation job")
    serve_samples: int = Field(2, ge=1, le=8, description="outputs per task asked of the service for the report")
    serve_steps: int = Field(20, ge=1)
    ray: RayConfig = Field(default_factory=lambda: RayConfig(num_cpus=2))


def stage_config(model: type[BaseModel], file: str, out: str, toy: str, edit: Callable[[dict], None] | None = None,
                  overrides: tuple[str, ...] = ()) -> Any:
    """A config of `configs/`, its `runs/shapesworld/` paths moved under `out` (and `runs/toy/` to
    `toy`), edited, validated."""
    raw = (CONFIGS / file).read_text().replace("runs/shapesworld/", f"{out.rstrip('/')}/")
    raw = raw.replace(TOY, f"{toy.rstrip('/')}/")
    data = yaml.safe_load(raw)
    if edit:
        edit(data)
    return load_config(model, data, overrides)


def toy_fingerprint(toy: Path) -> str:
    """The toy builds' identity: their manifests' bytes (config hash and build timings, so that a
    rebuild of the same config counts as new weights)."""
    from shapesworld.toy.clip import MANIFEST as CLIP_MANIFEST
    from shapesworld.toy.codecs import MANIFEST as CODECS_MANIFEST

    digest = hashlib.sha256()
    for path in (toy / "clip" / CLIP_MANIFEST, toy / "codecs" / CODECS_MANIFEST):
        digest.update(path.read_bytes() if path.is_file() else b"absent")
    return digest.hexdigest()[:16]


class Demo:
    def __init__(self, config: DemoConfig):
        self.config, self.out = config, Path(config.out)
        self.progress = Progress("demo")
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.lineage_path = self.out / "lineage.json"
        # stage -> {"input": what it read, "output": this run's identity, once it finished}
        self.lineage: dict[str, dict[str, str]] = (
            json.loads(self.lineage_path.read_text()) if self.lineage_path.is_file() else {})
        self.upstream = ""  # the identity of what the next stage reads

    def stage(self, name: str, config: BaseModel, output: str, run: Callable[[Any], dict],
              follow: Path | None = None) -> dict:
        """Run a job, or reuse its output when made with this config from the same inputs; `follow`
        is a metrics.jsonl whose lines are shown as they come. Stages run in order, each reading
        what the ones before it wrote."""
        entry = self.lineage.get(name, {})
        same_input = entry.get("input") == self.upstream
        reusable = is_reusable(output, config) if same_input and "output" in entry else None
        manifest = reusable.model_dump(mode="json") if reusable is not None else None
        if manifest is not None:
            self.progress.log(f"{name}: reusing {output} (same config and inputs)")
            self.reused.append(name)
            self.upstream = entry["output"]
            return manifest
        out = Path(output)
        if not same_input and out.exists() and self.out.resolve() in out.resolve().parents:
            # a job resumes into what its output holds; made from other inputs, that is stale
            self.progress.log(f"{name}: what it reads changed; removing {out}")
            shutil.rmtree(out)
        self.lineage[name] = {"input": self.upstream}  # with the same inputs, a rerun resumes
        self._write_lineage()
        self.progress.log(f"{name}: running")
        start = time.perf_counter()
        stop = threading.Event()
        if follow is not None:
            threading.Thread(target=self._follow, args=(follow, stop), daemon=True).start()
        try:
            manifest = run(config)
        finally:
            stop.set()
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.progress.log(f"{name}: done in {self.timings[name]} s")
        # what later stages read is new even where it came out the same: they run again
        self.upstream = self.lineage[name]["output"] = uuid.uuid4().hex[:16]
        self._write_lineage()
        return manifest

    def _write_lineage(self) -> None:
        self.lineage_path.parent.mkdir(parents=True, exist_ok=True)
        self.lineage_path.write_text(json.dumps(self.lineage, indent=1))

    def run(self) -> dict:
        from jobs import curate, encode, merge, synthesize, train
        from jobs.train_config import TrainConfig

        c, out = self.config, str(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.progress.phase(f"toy models (built once into {c.toy})")
        t0 = time.perf_counter()
        from shapesworld.toy.models import build_toy_models

        build_toy_models(c.toy, workers=c.ray.num_cpus or os.cpu_count() or 1)
        self.upstream = toy_fingerprint(Path(c.toy))
        self.timings["toy models"] = round(time.perf_counter() - t0, 1)
        init_ray(c.ray.num_cpus)

        def scale(data: dict) -> None:
            for source in data["sources"]:
                source["samples"] = max(50, round(source["samples"] * c.data_scale))

        manifests = {}
        cfg = stage_config(curate.CurateConfig, "curate_shapesworld.yaml", out, c.toy, scale)
        manifests["curate"] = self.stage("curate", cfg, cfg.output, curate.run)
        cfg = stage_config(synthesize.SynthesizeConfig, "synthesize_shapesworld.yaml", out, c.toy)
        manifests["synthesize"] = self.stage("synthesize", cfg, cfg.output, synthesize.run)
        data_checks = {"curation": checks.curation(manifests["curate"]["config"]["output"]),
                       "synthesis": checks.synthesis(cfg.output)}
        self.progress.log(f"ShapesWorld checks of the data: {json.dumps(data_checks)}")
        cfg = stage_config(encode.EncodeConfig, "encode_shapesworld.yaml", out, c.toy)
        manifests["encode"] = self.stage("encode", cfg, cfg.output, encode.run)
        for stage in ("stage1", "stage2"):
            cfg = stage_config(TrainConfig, f"train_shapesworld_{stage}.yaml", out, c.toy,
                                overrides=(f"steps={getattr(c.steps, stage)}", f"batch_size={c.batch_size}",
                                           *c.train_overrides))
            manifests[stage] = self.stage(f"train {stage}", cfg, cfg.run_dir, train.run,
                                          follow=Path(cfg.run_dir) / "metrics.jsonl")
        cfg = stage_config(merge.MergeJobConfig, "merge_shapesworld.yaml", out, c.toy)
        manifests["merge"] = self.stage("merge", cfg, cfg.output, merge.run)
        cfg = stage_config(TrainConfig, "train_shapesworld_stage3.yaml", out, c.toy,
                            overrides=(f"steps={c.steps.stage3}", f"batch_size={c.batch_size}", *c.train_overrides))
        manifests["stage3"] = self.stage("train stage3", cfg, cfg.run_dir, train.run,
                                         follow=Path(cfg.run_dir) / "metrics.jsonl")
        model_dir = manifests["stage3"]["model_dir"]

        self.progress.phase("serving the model and querying every task over HTTP")
        t0 = time.perf_counter()
        served = self._serve_and_query(model_dir)
        self.timings["serve"] = round(time.perf_counter() - t0, 1)

        self.progress.phase(f"quality: {c.quality.samples} held-out samples per task")
        t0 = time.perf_counter()
        quality = self._quality(model_dir)
        self.timings["quality"] = round(time.perf_counter() - t0, 1)

        def eval_scale(data: dict) -> None:
            for benchmark in data["benchmarks"]:
                benchmark["source"]["samples"] = c.evaluation_samples

        from jobs import evaluate
        from pipelines.evaluation.config import EvaluateConfig

        cfg = stage_config(EvaluateConfig, "evaluate_shapesworld.yaml", out, c.toy, eval_scale,
                           overrides=tuple(c.evaluation_overrides))
        evaluation = self.stage("evaluate", cfg, cfg.output, evaluate.run)

        metrics = {
            "quality": quality,
            "evaluation": {"output": cfg.output, "benchmarks": evaluation["benchmarks"],
                           "beside_paper": evaluation["beside_paper"]},
            "curation": manifests["curate"]["counts"],
            "synthesis": manifests["synthesize"]["counts"],
            "data_checks": data_checks,
            "encoding": manifests["encode"]["counts"],
            "training": {s: manifests[s].get("final_metrics", {}) for s in ("stage1", "stage2", "stage3")},
            "serving": served,
            "model_dir": model_dir,
            "stage_seconds": self.timings,
            "reused_stages": self.reused,
            "total_seconds": round(time.perf_counter() - start, 1),
            "config": c.model_dump(mode="json"),
        }
        (self.out / "metrics.json").write_bytes(dumps(metrics))
        self.progress.phase("report")
        from shapesworld.report import write_report

        write_report(self.out, metrics, manifests)
        self.progress.log(f"wrote {self.out / 'report.html'} and {self.out / 'metrics.json'}")
        goal = c.quality.goal
        for task, result in quality["tasks"].items():
            short = "   below the goal" if task in quality["below_goal"] else ""
            self.progress.log(f"  {task:5s} both {result['both']:.3f}  colour {result['colour']:.3f}  "
                              f"shape {result['shape']:.3f}{short}")
        if quality["below_goal"]:
            self.progress.log(f"quality: {len(quality['below_goal'])} of {len(quality['tasks'])} tasks fall short of "
                              f"{goal} both (colour and shape right): {', '.join(quality['below_goal'])}")
        else:
            self.progress.log(f"quality: every task reaches {goal} both (colour and shape right)")
        self.progress.log(f"total {metrics['total_seconds']} s")
        self.progress.log(f"the model is in {model_dir}: serve it with `python -m serve --model {model_dir}` "
                          "(for runs/demo/model also `serve run serve/config.yaml`), or load it with "
                          "`OmniFlowPipeline.from_pretrained`")
        return metrics

    def _follow(self, metrics_log: Path, stop: threading.Event) -> None:
        """Log each new line of a training run's metrics.jsonl (workers' own output is not shown)."""
        seen = 0
        while not stop.wait(2.0):
            if not metrics_log.is_file():
                continue
            lines = metrics_log.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line being written
                    break
                val = f", val {r['val/loss']:.4f}" if "val/loss" in r else ""
                self.progress.log(f"  step {r['step']}: loss {r['loss']:.4f}{val}, {r['samples_per_s']:.0f} samples/s")
                seen += 1

    def _serve_and_query(self, model_dir: str) -> dict:
        """Deploy the service on the local cluster, ask every task over HTTP, save the answers."""
        from ray import serve

        from serve.app import build_app
        from serve.client import Client, write_outputs
        from shapesworld.defects import make_records

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": model_dir}), name="omniflow", route_prefix="/")
        client = Client(f"http://127.0.0.1:{port}")
        record = make_records(1, seed=self.config.quality.scene_seed + 1)[0]
        fields = {"text": record["caption"], "image": record["image"], "audio": record["audio"]}
        samples = self.out / "samples"
        answers = {"inputs": {"caption": record["caption"], "concept": f"{record['colour']} {record['shape']}"},
                   "tasks": {}}
        samples.mkdir(parents=True, exist_ok=True)
        (samples / "input.png").write_bytes(record["image"])
        (samples / "input.wav").write_bytes(record["audio"])
        try:
            for task, spec in BUILTIN_TASKS.items():
                inputs = {m.value: fields[m.value] for m in spec.conditions}
                result = client.generate(task, steps=self.config.serve_steps, seed=0,
                                         num_outputs=self.config.serve_samples,
                                         guidance=self.config.quality.guidance if inputs else 1.0, **inputs)
                paths = write_outputs(result, samples)
                answers["tasks"][task] = {"files": [str(p.relative_to(self.out)) for p in paths], "text": result.text,
                                          "timings": result.timings}
                self.progress.log(f"  {task}: {', '.join(p.name for p in paths)} ({result.timings['total_s']:.2f} s)")
        finally:
            serve.shutdown()
        return answers

    def _quality(self, model_dir: str) -> dict:
        from omniflow.inference import AnyToAny
        from shapesworld.quality import evaluate

        pipe = AnyToAny.load(model_dir)
        return evaluate(pipe, self.config.quality, log=lambda m: self.progress.log(f"  {m}"))


def run(config: DemoConfig) -> dict:
    return Demo(config).run()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shapesworld.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="DemoConfig fields, e.g. data_scale=0.25 steps.stage3=300 quality.samples=50")

    def load(args) -> DemoConfig:
        return load_config(DemoConfig, {"out": args.out}, args.overrides)

    return job_main(DemoConfig, run, argv, prog="python -m shapesworld.demo", description=__doc__, parser=parser, load=load)


if __name__ == "__main__":
    sys.exit(main())
