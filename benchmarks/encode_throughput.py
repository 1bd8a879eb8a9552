"""Encode throughput: the Ray Data encode job against the bare codec forward in one process.

Both paths encode the same ShapesWorld rows (PNG images, captions, WAV clips) at the same batch
size with the same codecs: the bare path decodes, preprocesses and encodes batch after batch in
this process (codecs loaded beforehand); the Ray path is `jobs.encode.run` on a local cluster:
read parts -> `LatentPreprocess` (CPU actors) -> `LatentEncoder` (actors) -> latent parts ->
manifest. Writes JSON with both rates (rows/s) and their ratio. The Ray numbers include actor
start-up (each encoder actor loads the codecs); `ray.steady_rows_per_s` subtracts it (measured by
a one-batch run of the same job). The bare rate is the mean of a run before and one after the Ray
runs; both are in the JSON, so drift from other load on the machine is visible.

    python benchmarks/encode_throughput.py --out runs/bench/encode_throughput.json        # toy codecs
    python benchmarks/encode_throughput.py --rows 8192 --batch-size 256 --device cuda --encoder-gpus 1 --out gpu.json
"""

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray
import torch

from jobs.encode import EncodeConfig, run
from omniflow import storage as st
from omniflow.modality import Modality
from pipelines.encode import load_encoders
from pipelines.manifest import adopt_parts
from pipelines.resources import resolve_device
from pipelines.schema import CURATED_SAMPLE, SCHEMA_VERSION, conform
from shapesworld import make_records
from shapesworld.toy.codecs import build_toy_codecs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--parts", type=int, default=8, help="input parts the rows are spread over")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--toy-dir", type=Path, default=Path("runs/toy/codecs"), help="toy codecs (built if absent)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--decode-actors", type=int, default=1)
    parser.add_argument("--decode-cpus", type=float, default=0.5)
    parser.add_argument("--encoder-actors", type=int, default=1)
    parser.add_argument(
        "--encoder-cpus", type=float, default=os.cpu_count(),
        help="CPUs per encoder actor; Ray gives it as many torch threads, so the default matches the bare path",
    )
    parser.add_argument("--encoder-gpus", type=float, default=0.0)
    parser.add_argument("--cpus", type=int, help="CPUs of the local Ray cluster (default: what the stages reserve)")
    args = parser.parse_args(argv)
    if args.cpus is None:  # logical CPUs: the decode actors and I/O tasks share the cores with the encoder
        args.cpus = math.ceil(args.encoder_actors * args.encoder_cpus + args.decode_actors * args.decode_cpus + 0.5)
    return args


def write_input(root: str, records: list[dict], parts: int) -> None:
    """A curate output (parts + manifest.json) of ShapesWorld `records`."""
    paths = []
    for p in range(parts):
        chunk = [
            {"key": f"shapes/{p}/{i}", "source": "shapes", "shard": str(p), "sample_id": r["id"], "image": r["image"],
             "caption": r["caption"], "audio": r["audio"], "source_weight": 1.0, "schema_version": SCHEMA_VERSION}
            for i, r in enumerate(records[p::parts])
        ]
        path = st.join(root, "curated", f"part-{p:05d}.parquet")
        st.write_parquet_atomic(conform(pa.Table.from_pylist(chunk), CURATED_SAMPLE), path, st.StorageConfig())
        paths.append(path)
    adopt_parts(root, paths, st.StorageConfig())


def job_config(args: argparse.Namespace, input_dir: str, output: str) -> EncodeConfig:
    return EncodeConfig.model_validate({
        "input": input_dir, "output": output, "codec_sets": [str(args.toy_dir)], "dtype": args.dtype,
        "rows_per_shard": max(args.batch_size, 1024),
        "decode": {"batch_size": args.batch_size, "concurrency": args.decode_actors, "num_cpus": args.decode_cpus,
                   "device": "cpu"},
        "encoder": {"batch_size": args.batch_size, "concurrency": args.encoder_actors, "num_cpus": args.encoder_cpus,
                    "num_gpus": args.encoder_gpus, "device": args.device},
    })


def bare_forward(config: EncodeConfig, records: list[dict], batch_size: int) -> dict:
    """Decode, preprocess and encode every modality batch after batch here (codecs loaded first)."""
    device = resolve_device(config.encoder.device)
    codecs, _ = load_encoders(config.encoding(), device)
    image, text, audio = codecs[Modality.IMAGE], codecs[Modality.TEXT], codecs[Modality.AUDIO]

    @torch.inference_mode()
    def encode(lo: int, hi: int) -> None:
        rows = records[lo:hi]
        image.encode(image.preprocess([r["image"] for r in rows])).cpu()
        text.encode([r["caption"] for r in rows]).cpu()
        audio.encode(audio.preprocess([r["audio"] for r in rows])).cpu()

    encode(0, batch_size)  # warm-up
    start = time.perf_counter()
    for lo in range(0, len(records), batch_size):
        encode(lo, lo + batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "rows_per_s": round(len(records) / seconds, 1),
            "torch_threads": torch.get_num_threads()}


def ray_job(args: argparse.Namespace, records: list[dict], work: str) -> dict:
    """The job over all rows, and over one batch of rows (its start-up: actors loading codecs)."""
    def timed(rows: int, name: str) -> tuple[float, dict]:
        input_dir = st.join(work, f"input-{name}")
        write_input(input_dir, records[:rows], min(args.parts, rows))
        start = time.perf_counter()
        manifest = run(job_config(args, input_dir, st.join(work, f"latents-{name}")))
        return time.perf_counter() - start, manifest

    startup, _ = timed(args.batch_size, "one-batch")
    seconds, manifest = timed(args.rows, "all")
    encoded = sum(c["encoded"] for c in manifest["counts"].values())
    assert encoded == args.rows, f"{args.rows - encoded} rows were not encoded: {manifest['counts']}"
    return {
        "seconds": round(seconds, 2),
        "rows_per_s": round(args.rows / seconds, 1),
        "encoding_phase_s": manifest["timings"]["encoding"],
        "startup_s": round(startup, 2),
        "steady_rows_per_s": round((args.rows - args.batch_size) / max(seconds - startup, 1e-9), 1),
        "latent_parts": len(manifest["outputs"]["latents"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build_toy_codecs(args.toy_dir, log=lambda msg: None)
    config = job_config(args, "unused", "unused")
    records = make_records(args.rows, seed=0)
    bare_before = bare_forward(config, records, args.batch_size)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="ray-", ignore_cleanup_errors=True) as temp_dir:
        ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            distributed = ray_job(args, records, str(Path(temp_dir) / "work"))
        finally:
            ray.shutdown()
    # measured on both sides of the Ray run: on a shared machine the difference shows the drift
    bare_after = bare_forward(config, records, args.batch_size)
    bare = {"rows_per_s": round((bare_before["rows_per_s"] + bare_after["rows_per_s"]) / 2, 1),
            "before": bare_before, "after": bare_after}

    result = {
        "codecs": str(args.toy_dir),
        "rows": args.rows,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": str(resolve_device(args.device)),
        "cpus": os.cpu_count(),
        "ray_cpus": args.cpus,
        "actors": {"decode": [args.decode_actors, args.decode_cpus],
                   "encoder": [args.encoder_actors, args.encoder_cpus, args.encoder_gpus]},
        "bare": bare,
        "ray": distributed,
        "ratio": round(distributed["rows_per_s"] / bare["rows_per_s"], 3),
        "steady_ratio": round(distributed["steady_rows_per_s"] / bare["rows_per_s"], 3),
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
