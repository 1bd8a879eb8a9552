"""The synthesis job end to end on a real local Ray cluster: ShapesWorld pair datasets curated by
the curate job and completed into triplets, rejects, S3, and kill + resume."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs.curate import CurateConfig
from jobs.curate import run as curate
from jobs.synthesize import SynthesizeConfig, main, run
from omniflow import storage as st
from omniflow.codecs.media import decode_audio, decode_image
from omniflow.config import ConfigError, load_config
from pipelines.generators.base import row_seed
from pipelines.generators.config import GeneratorsConfig
from pipelines.generators.factory import build_generator
from pipelines.generators.stage import fill_batch, start_rows
from pipelines.manifest import adopt_parts
from pipelines.parts import read_parts
from pipelines.schema import CURATED_SAMPLE, DROPPED_SAMPLE, SCHEMA_VERSION, TRIPLET_SAMPLE
from shapesworld import checks, make_records, read_audio, read_caption, read_image

RENDERER = {"type": "shapesworld", "resources": {"batch_size": 16, "concurrency": 1, "num_cpus": 0.5}}
GENERATORS = {"caption": RENDERER, "image": RENDERER, "audio": RENDERER}
# Pair datasets as ShapesWorld sources: (name, seed, modalities kept).
PAIRS = [("image_text", 1, ["image", "caption"]), ("audio_text", 2, ["audio", "caption"]),
         ("image_audio", 3, ["image", "audio"]), ("triplets", 4, ["image", "caption", "audio"])]
SAMPLES = 24


def _config(input: str, output: str, **extra) -> SynthesizeConfig:
    return SynthesizeConfig.model_validate({"input": input, "output": output, "generators": GENERATORS,
                                            "ray": {"num_cpus": 2}, **extra})


def _curated_input(root: str, rows: list[dict], storage: st.StorageConfig, *, per_part: int) -> str:
    """A curate job's output holding `rows` (as the curate job writes it: parts + manifest)."""
    table = pa.Table.from_pylist(
        [{"shard": "0", "sample_id": r["key"], "source_weight": 1.0, "schema_version": SCHEMA_VERSION, **r} for r in rows],
        schema=CURATED_SAMPLE,
    )
    parts = []
    for i in range(0, table.num_rows, per_part):
        parts.append(st.join(root, "curated", "run", f"part-{i:05d}.parquet"))
        st.write_parquet_atomic(table.slice(i, per_part), parts[-1], storage)
    adopt_parts(root, parts, storage)
    return root


def _triplets(manifest: dict, storage=None) -> pa.Table:
    return read_parts(manifest["outputs"]["triplets"], storage or st.StorageConfig())


def test_shapesworld_pairs_become_triplets(tmp_path, ray_cluster):
    """Curate pair datasets with the curate job, complete them, and read every generated modality
    back with the ShapesWorld checkers."""
    sources = [{"name": n, "type": "shapesworld", "samples": SAMPLES, "seed": s, "samples_per_shard": 12,
                "modalities": m} for n, s, m in PAIRS]
    curate(CurateConfig.model_validate({"output": str(tmp_path / "curated"), "sources": sources}))
    manifest = run(_config(str(tmp_path / "curated"), str(tmp_path / "out")))

    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["job"] == "synthesize" and on_disk["counts"] == manifest["counts"]
    assert on_disk["input"]["manifest"] == str(tmp_path / "curated" / "manifest.json")
    assert len(on_disk["config_hash"]) == 16 and "diffusers" in on_disk["versions"]
    missing = {n: ({"image", "caption", "audio"} - set(m)) for n, _, m in PAIRS}
    for name, counts in manifest["counts"].items():
        assert counts["input"] == SAMPLES == counts["kept"] + counts["rejected"] and counts["rejected"] == 0
        assert counts["generated"] == {m: SAMPLES * (m in missing[name]) for m in ("image", "caption", "audio")}
    agreement = checks.synthesis(str(tmp_path / "out"))
    assert set(agreement) == {"image", "caption", "audio"}
    assert all(v["agreement"] == 1.0 and v["generated"] == SAMPLES for v in agreement.values())

    table = _triplets(manifest)
    assert table.schema.equals(TRIPLET_SAMPLE, check_metadata=False)
    for name, seed, kept in PAIRS:
        rows = [r for r in table.to_pylist() if r["source"] == name]
        truth = {r["id"]: (r["colour"], r["shape"]) for r in make_records(SAMPLES, seed=seed)}
        concepts = [truth[r["sample_id"]] for r in rows]
        for modality in ("image", "caption", "audio"):
            synthetic = [r[f"{modality}_synthetic"] for r in rows]
            provenance = [r[f"{modality}_provenance"] for r in rows]
            if modality in kept:
                assert not any(synthetic) and provenance == [None] * len(rows)
                continue
            assert all(synthetic)
            assert all(p["generator"] == "shapesworld-renderer" and p["seed"] == row_seed(0, r["key"])
                       for p, r in zip(provenance, rows))
            values = [r[modality] for r in rows]
            if modality == "image":
                reading = read_image([np.asarray(decode_image(v)) for v in values])
            elif modality == "audio":
                assert all(v[:4] == b"fLaC" for v in values)
                reading = read_audio([decode_audio(v)[0] for v in values])
            else:
                reading = read_caption(values)
            agree = np.mean([c == t for c, t in zip(zip(reading.colours, reading.shapes), concepts)])
            assert agree >= 0.95, (name, modality, agree)


def test_s3_input_and_output_with_rows_that_cannot_be_completed(s3_server, ray_cluster):
    """On S3: rows completed from the caption, and rows that cannot be completed rejected with
    their reason; a rerun finds everything written and generates nothing."""
    bucket = s3_server.new_bucket()
    storage = s3_server.storage
    records = make_records(12, seed=9)
    rows = [{"key": f"s/{i:02d}", "source": "s", "image": r["image"] if i % 2 else None, "caption": r["caption"],
             "audio": r["audio"]} for i, r in enumerate(records[:8])]
    rows += [
        {"key": "t/0", "source": "t", "image": None, "caption": "a photo of a dog", "audio": records[8]["audio"]},
        {"key": "t/1", "source": "t", "image": None, "caption": records[9]["caption"], "audio": None},
        {"key": "t/2", "source": "t", "image": None, "caption": None, "audio": records[10]["audio"]},
        {"key": "t/3", "source": "t", "image": records[11]["image"], "caption": records[11]["caption"], "audio": None},
    ]
    _curated_input(f"s3://{bucket}/curated", rows, storage, per_part=5)
    config = _config(f"s3://{bucket}/curated", f"s3://{bucket}/out", fill=["caption", "image"],
                     storage={"endpoint_url": s3_server.endpoint_url, "region": "us-east-1"})
    first = run(config)
    assert first["counts"] == {
        "s": {"input": 8, "kept": 8, "rejected": 0, "generated": {"image": 4, "caption": 0, "audio": 0}},
        "t": {"input": 4, "kept": 0, "rejected": 4, "generated": {"image": 0, "caption": 0, "audio": 0}},
    }
    assert all(p.startswith(f"s3://{bucket}/out/triplets/part-") for p in first["outputs"]["triplets"])
    assert json.loads(st.read_bytes(f"s3://{bucket}/out/manifest.json", storage))["outputs"] == first["outputs"]
    assert _triplets(first, storage).schema.equals(TRIPLET_SAMPLE, check_metadata=False)

    rejects = read_parts(first["outputs"]["rejects"], storage)
    assert rejects.schema.equals(DROPPED_SAMPLE, check_metadata=False)
    reasons = dict(zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist()))
    assert "caption names no ShapesWorld concept" in reasons["t/0"] and "a photo of a dog" in reasons["t/0"]
    assert reasons["t/1"] == reasons["t/3"] == "no audio, and audio is not in fill"
    assert reasons["t/2"] == "no caption, and no image to generate it from"
    assert set(rejects.column("stage").to_pylist()) == {"synthesize"}
    assert set(rejects.column("status").to_pylist()) == {"rejected"}
    assert first["reject_reasons"]["image generation (shapesworld-renderer) failed: caption names no "
                                   "ShapesWorld concept (one colour and one shape)"] == 1

    second = run(config)
    assert second["counts"] == first["counts"] and second["outputs"] == first["outputs"]


def _digest(table: pa.Table) -> dict[str, tuple]:
    def h(value):
        return None if value is None else hashlib.sha256(value if isinstance(value, bytes) else value.encode()).hexdigest()

    return {r["key"]: (h(r["image"]), h(r["caption"]), h(r["audio"])) for r in table.to_pylist()}


def test_killed_run_resumes_without_loss_or_duplication(tmp_path, ray_cluster, capsys):
    """SIGKILL the job once its first parts land; the rerun completes it, each row there once
    and with the bytes an uninterrupted generation gives."""
    records = make_records(96, seed=6)
    rows = [{"key": f"s/{i:04d}", "source": "s", "image": r["image"] if i % 3 else None,
             "caption": r["caption"] if i % 3 != 1 else None, "audio": r["audio"] if i % 3 != 2 else None}
            for i, r in enumerate(records)]
    curated = _curated_input(str(tmp_path / "in"), rows, st.StorageConfig(), per_part=4)
    small = {**RENDERER, "resources": {**RENDERER["resources"], "batch_size": 4}}
    config = {"input": curated, "output": str(tmp_path / "out"), "ray": {"num_cpus": 2}, "rows_per_part": 4,
              "generators": {"caption": small, "image": small, "audio": small}}
    path = tmp_path / "synthesize.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)  # its own cluster, killed with it
    job = subprocess.Popen([sys.executable, "-m", "jobs.synthesize", "--config", str(path)], env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    triplets = tmp_path / "out" / "triplets"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(triplets.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    parts_before = len(list(triplets.glob("part-*.parquet")))
    assert parts_before >= 2 and not (tmp_path / "out" / "manifest.json").exists()

    manifest = run(SynthesizeConfig.model_validate(config))
    assert "resuming" in capsys.readouterr().out
    assert manifest["counts"]["s"]["input"] == 96 == manifest["counts"]["s"]["kept"]
    # a write task Ray ran twice before the kill leaves a second copy of its rows: the rerun drops it
    # (`duplicate_rows_dropped`), and below every key is there once
    assert len(manifest["outputs"]["triplets"]) > parts_before
    table = _triplets(manifest)
    assert sorted(table.column("key").to_pylist()) == [r["key"] for r in rows]

    # The bytes are those of one uninterrupted pass of the same generators over the same rows.
    expected = start_rows(read_parts(json.loads((tmp_path / "in" / "manifest.json").read_text())["outputs"]["curated"],
                                     st.StorageConfig()), ["image", "caption", "audio"])
    generators = GeneratorsConfig.model_validate(config["generators"])
    for modality in ("caption", "image", "audio"):
        expected = fill_batch(expected, build_generator(modality, getattr(generators, modality)), base_seed=0)
    assert _digest(table) == _digest(expected)


def _dies_after_first_commit(marker: str):
    """A `KeptRejectedSink` whose first write task commits its parts, commits its live rows again as
    rejects (as if generation had failed before a retry succeeded), records how many rows it wrote
    twice, and kills its worker: Ray runs the task again, which commits the same rows under new
    part names. Defined in a function so that Ray ships the class by value to its workers."""
    from pipelines.parts import AtomicParquetSink, KeptRejectedSink
    from pipelines.rows import dropped_rows
    from pipelines.schema import DROPPED_SAMPLE, REJECT_REASON

    class DiesAfterFirstCommit(KeptRejectedSink):
        def write(self, blocks, ctx):
            table = pa.concat_tables([b for b in blocks if b.num_rows])
            written = super().write([table], ctx)
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return written
            live = table.filter(table.column(REJECT_REASON.name).is_null())
            failed = live.set_column(live.schema.get_field_index(REJECT_REASON.name), REJECT_REASON.name,
                                     pa.array(["generation failed (transient)"] * live.num_rows, pa.string()))
            rejects = AtomicParquetSink(self.directories["rejects"], DROPPED_SAMPLE, self.storage)
            rejects.write([dropped_rows(failed, stage=self.reject_stage)], ctx)
            os.write(fd, str(table.num_rows + live.num_rows).encode())
            os.close(fd)
            os._exit(1)

    return DiesAfterFirstCommit


def test_write_task_retried_after_it_committed(tmp_path, ray_cluster, monkeypatch):
    """A forced retry: one write task commits (its rows as triplets and as rejects), its worker
    dies, Ray runs it again. Each key ends in exactly one output, completed rows win over the
    first attempt's rejects, the counts add up, and a rerun changes nothing."""
    import jobs.synthesize

    records = make_records(16, seed=11)
    rows = [{"key": f"s/{i:02d}", "source": "s", "image": None, "caption": r["caption"], "audio": r["audio"]}
            for i, r in enumerate(records)]
    rows += [{"key": "s/bad", "source": "s", "image": None, "caption": None, "audio": records[0]["audio"]}]
    curated = _curated_input(str(tmp_path / "in"), rows, st.StorageConfig(), per_part=6)
    config = _config(curated, str(tmp_path / "out"), fill=["image"], rows_per_part=4)
    marker = tmp_path / "first-attempt"
    monkeypatch.setattr(jobs.synthesize, "KeptRejectedSink", _dies_after_first_commit(str(marker)))
    manifest = run(config)

    assert manifest["duplicate_rows_dropped"] == int(marker.read_text()) > 0  # what the first attempt wrote
    assert manifest["counts"]["s"] == {"input": 17, "kept": 16, "rejected": 1,
                                       "generated": {"image": 16, "caption": 0, "audio": 0}}
    triplets = _triplets(manifest).column("key").to_pylist()
    rejects = read_parts(manifest["outputs"]["rejects"], st.StorageConfig())
    assert sorted(triplets) == [r["key"] for r in rows[:-1]]
    assert rejects.column("key").to_pylist() == ["s/bad"] and "transient" not in rejects.column("reason")[0].as_py()

    files = {p: Path(p).read_bytes() for kind in ("triplets", "rejects") for p in manifest["outputs"][kind]}
    again = run(config)
    assert again["duplicate_rows_dropped"] == 0 and again["counts"] == manifest["counts"]
    assert again["outputs"] == manifest["outputs"] and {p: Path(p).read_bytes() for p in files} == files


def test_bad_config_or_input_exits_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="generators.audio"):
        load_config(SynthesizeConfig, None, [f"input={tmp_path}", f"output={tmp_path}/o", "generators={}",
                                             "fill=[audio]"])
    with pytest.raises(ConfigError, match="fill"):
        load_config(SynthesizeConfig, None, [f"input={tmp_path}", "output=o", "fill=[image, image]"])
    assert main(["--config", "configs/synthesize_shapesworld.yaml", f"input={tmp_path}", f"output={tmp_path}/o"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({"job": "encode", "outputs": {}}))
    assert main(["--config", "configs/synthesize_shapesworld.yaml", f"input={tmp_path}", f"output={tmp_path}/o"]) == 2
    assert "is not a job manifest this version reads" in capsys.readouterr().err
    adopt_parts(str(tmp_path), [], st.StorageConfig(), job="synthesize")  # a whole manifest, of another job
    assert main(["--config", "configs/synthesize_shapesworld.yaml", f"input={tmp_path}", f"output={tmp_path}/o"]) == 2
    assert "is a synthesize job's manifest; expected curate" in capsys.readouterr().err
