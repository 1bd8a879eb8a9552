"""The curation job end to end on a real local Ray cluster: counts, outputs, S3, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.curate import CurateConfig, main, run
from omniflow import storage as st
from omniflow.config import ConfigError, load_config
from pipelines.parts import committed_parts, read_parts
from pipelines.schema import CURATED_SAMPLE, DROPPED_SAMPLE
from shapesworld import checks

SOURCE = {"name": "shapes", "type": "shapesworld", "samples": 120, "seed": 3, "defect_rate": 0.25,
          "samples_per_shard": 20, "filters": {"min_caption_chars": 3}}


def _config(output: str, **extra) -> dict:
    return {"output": output, "sources": [SOURCE], "ray": {"num_cpus": 2}, **extra}


def _check_manifest(manifest: dict) -> None:
    counts = manifest["counts"]["shapes"]
    assert counts["input"] == 120
    assert counts["input"] == counts["kept"] + counts["filtered"] + counts["rejected"]
    assert counts["rejected"] > 0 and counts["kept"] > 60
    assert manifest["source_weights"] == {"shapes": 1.0}
    assert len(manifest["config_hash"]) == 16 and "ray" in manifest["versions"]


def test_local_run_writes_consistent_outputs(tmp_path, ray_cluster):
    manifest = run(CurateConfig.model_validate(_config(str(tmp_path / "out"))))
    _check_manifest(manifest)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]
    curated = pq.read_table(next(iter(manifest["outputs"]["curated"]))).schema
    assert curated.equals(CURATED_SAMPLE, check_metadata=False)
    kept = sum(pq.read_metadata(p).num_rows for p in manifest["outputs"]["curated"])
    assert kept == manifest["counts"]["shapes"]["kept"]
    rejects = pq.read_table(manifest["outputs"]["rejects"])
    assert rejects.schema.equals(DROPPED_SAMPLE, check_metadata=False)
    reasons = " ".join(rejects.column("reason").to_pylist())
    assert "could not be decoded" in reasons and "silent" in reasons
    semantics = checks.curation(manifest["config"]["output"], st.StorageConfig(**manifest["config"]["storage"]))["shapes"]
    assert semantics["defects_removed"] > 0 and semantics["clean_kept"] == 1.0


def _keys(paths: list[str], storage) -> list[str]:
    return sorted(k for p in paths for k in read_parts([p], storage, columns=["key"]).column("key").to_pylist())


def test_s3_output_and_rerun_is_idempotent(s3_server, ray_cluster):
    """On S3, with a scored part committed twice under two names (a scoring write task that Ray
    retried): the rerun scores nothing, keeps one copy, and each key is kept or not, once."""
    bucket = s3_server.new_bucket()
    storage = {"endpoint_url": s3_server.endpoint_url}
    config = CurateConfig.model_validate(_config(f"s3://{bucket}/run", storage=storage))
    first = run(config)
    _check_manifest(first)
    assert all(p.startswith("s3://") for p in first["outputs"]["curated"])
    first_kept = _keys(first["outputs"]["curated"], config.storage)
    scored = committed_parts(f"s3://{bucket}/run/scored", config.storage)
    st.write_bytes_atomic(f"s3://{bucket}/run/scored/part-retried.parquet", st.read_bytes(scored[0], config.storage),
                          config.storage)
    second = run(config)  # everything already scored: nothing is read or scored again
    assert second["counts"] == first["counts"] and second["duplicate_rows_dropped"] == 0
    assert second["duplicate_scored_rows_dropped"] == len(_keys(scored[:1], config.storage)) > 0
    assert len(committed_parts(f"s3://{bucket}/run/scored", config.storage)) == len(scored)
    kept, dropped = _keys(second["outputs"]["curated"], config.storage), _keys([second["outputs"]["rejects"]], config.storage)
    assert len(kept) == len(set(kept)) == second["counts"]["shapes"]["kept"] and not set(kept) & set(dropped)
    assert len(kept) + len(dropped) == len(set(kept + dropped)) == second["counts"]["shapes"]["input"]
    assert kept == first_kept

    curated = st.list_files(f"s3://{bucket}/run/curated/*", config.storage)
    assert len(curated) == 1, "earlier runs' curated outputs are removed once the manifest moves on"


def test_killed_run_resumes_without_loss_or_duplication(tmp_path, ray_cluster, capsys):
    """Kill the job after its first scored parts land, rerun it, compare with an uninterrupted run.
    The killed run is its own process (with its own Ray cluster); the rerun and the uninterrupted
    run go through the same `run` on this session's cluster."""
    config = tmp_path / "curate.json"
    source = {**SOURCE, "samples": 400, "samples_per_shard": 10}
    settings = {"output": str(tmp_path / "killed"), "sources": [source], "ray": {"num_cpus": 1},
                "decode": {"batch_size": 8}}
    config.write_text(json.dumps(settings))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    job = subprocess.Popen([sys.executable, "-m", "jobs.curate", "--config", str(config)], env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scored = tmp_path / "killed" / "scored"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(scored.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    parts_before = len(list(scored.glob("part-*.parquet")))
    assert parts_before >= 2 and not (tmp_path / "killed" / "manifest.json").exists()

    capsys.readouterr()
    a = run(CurateConfig.model_validate(settings))
    assert "resuming" in capsys.readouterr().out
    b = run(CurateConfig.model_validate({**settings, "output": str(tmp_path / "straight")}))
    assert a["counts"] == b["counts"] and a["duplicate_scored_rows_dropped"] == 0

    def kept_keys(manifest):
        return sorted(k for p in manifest["outputs"]["curated"] for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())

    assert kept_keys(a) == kept_keys(b) and len(kept_keys(a)) == a["counts"]["shapes"]["kept"]


def test_bad_config_names_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="sources.0"):
        load_config(CurateConfig, None, [f"output={tmp_path}", "sources=[{name: x, type: nope}]"])
    assert main(["output=" + str(tmp_path), "sources=[]"]) == 2
    assert "sources" in capsys.readouterr().err


@pytest.fixture
def toy_clip_dir(toy_clip) -> Path:
    return toy_clip[0]


def _toy_clip_config(clip_dir: Path) -> dict:
    import yaml

    config = yaml.safe_load(Path("configs/curate_shapesworld.yaml").read_text())
    for key in ("config_file", "pretrained"):
        config["clip"]["clip"][key] = config["clip"]["clip"][key].replace("runs/toy/clip", str(clip_dir))
    config["clip"]["aesthetic"]["weights"] = config["clip"]["aesthetic"]["weights"].replace("runs/toy/clip", str(clip_dir))
    return config


def test_shapesworld_semantics_with_the_toy_clip(tmp_path, ray_cluster, toy_clip_dir):
    """Planted mismatches are removed and clean pairs kept, scored by the toy CLIP through the job."""
    config = _toy_clip_config(toy_clip_dir)
    config["output"] = str(tmp_path / "out")
    config["sources"] = config["sources"][:1]  # the image-text source, where captions can mismatch
    config["sources"][0].update(name="shapes", samples=400, samples_per_shard=100)
    manifest = run(CurateConfig.model_validate(config))
    semantics = checks.curation(config["output"])["shapes"]
    print(semantics, manifest["counts"])
    assert semantics["mismatched_removed"] >= 0.9 and semantics["clean_kept"] >= 0.9
    assert set(manifest["outputs"]["plots"]) == {"clip_score", "aesthetic_score"}
    assert "min_clip_score" in manifest["thresholds"]["shapes"]
    counts = manifest["counts"]["shapes"]
    assert counts["input"] == 400 == counts["kept"] + counts["filtered"] + counts["rejected"]


def test_near_duplicates_by_embedding_are_removed(tmp_path, ray_cluster, toy_clip_dir):
    """Re-encoded copies (other bytes, same pixels) escape the content hash; the embedding rule
    removes exactly one of each pair."""
    import io

    import pyarrow as pa
    from PIL import Image

    from shapesworld import make_records

    records = make_records(30, seed=5)
    rows = [{"id": r["id"], "image": r["image"], "caption": r["caption"]} for r in records]
    for r in records[:10]:
        webp = io.BytesIO()
        Image.open(io.BytesIO(r["image"])).save(webp, "WEBP", lossless=True)
        rows.append({"id": r["id"] + "-copy", "image": webp.getvalue(), "caption": r["caption"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")

    config = _toy_clip_config(toy_clip_dir)
    config["output"] = str(tmp_path / "out")
    config["sources"] = [{"name": "pairs", "type": "parquet", "path": str(tmp_path / "pairs.parquet"),
                          "id_column": "id", "filters": {"near_duplicate_cosine": 0.9995}}]
    manifest = run(CurateConfig.model_validate(config))
    counts = manifest["counts"]["pairs"]
    assert counts["by_stage"] == {"filtered/near_duplicate": 10} and counts["kept"] == 30
    rejects = pq.read_table(manifest["outputs"]["rejects"]).to_pylist()
    dropped = {r["sample_id"].removesuffix("-copy") for r in rejects}
    assert dropped == {r["id"] for r in records[:10]}  # one of each pair, whichever CLIP scored lower
