"""Typed job manifests: counts that do not add up are refused where they are written, a job reads
its upstream through one function with errors naming the field, reuse goes by the config hash,
and parts made outside the jobs can be adopted as a job's output."""

import json

import pyarrow as pa
import pytest
from pydantic import BaseModel, ValidationError

from omniflow import storage as st
from omniflow.config import ConfigError, config_hash
from pipelines.manifest import (
    CurateCounts,
    CurateManifest,
    EncodeCounts,
    SynthesizeCounts,
    adopt_parts,
    is_reusable,
    read_manifest,
    read_upstream,
    write_manifest,
)
from pipelines.schema import CURATED_SAMPLE, SCHEMA_VERSION, TRIPLET_SAMPLE, conform

LOCAL = st.StorageConfig()


class Settings(BaseModel):
    value: int


def curate_manifest(config: BaseModel, **counts: int) -> CurateManifest:
    return CurateManifest.of(config, {"total": 1.0}, inputs={"a": ["part-0"]}, run_id="r",
                             counts={"a": counts or {"input": 3, "kept": 2, "filtered": 1, "rejected": 0}},
                             source_weights={"a": 1.0}, outputs={"curated": ["p"], "rejects": "r.parquet"})


@pytest.mark.parametrize("model, fields", [
    (CurateCounts, {"input": 5, "kept": 2, "filtered": 1, "rejected": 1}),
    (SynthesizeCounts, {"input": 5, "kept": 3, "rejected": 1}),
    (EncodeCounts, {"input": 5, "encoded": 3, "rejected": 1}),
])
def test_counts_that_do_not_add_up_are_refused(model, fields):
    with pytest.raises(ValidationError, match="5 input != "):
        model(**fields)
    fields["input"] = 4
    assert model(**fields).input == 4


def test_write_read_and_reuse(tmp_path):
    out = str(tmp_path / "run")
    written = write_manifest(out, curate_manifest(Settings(value=1)), LOCAL)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text()) == written
    assert written["config_hash"] == config_hash(Settings(value=1)) and written["schema_version"] == SCHEMA_VERSION
    assert "pyarrow" in written["versions"] and written["counts"]["a"]["kept"] == 2
    again = read_manifest(out, LOCAL)
    assert isinstance(again, CurateManifest) and again.counts["a"].filtered == 1
    assert is_reusable(out, Settings(value=1)) == again
    assert is_reusable(out, Settings(value=2)) is None
    assert is_reusable(str(tmp_path / "absent"), Settings(value=1)) is None
    assert read_upstream(out, LOCAL, job=("curate", "synthesize")).outputs.curated == ["p"]


def test_upstream_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"input: no manifest.json in .*expected a finished curate job's output"):
        read_upstream(str(tmp_path), LOCAL, job="curate")
    write_manifest(str(tmp_path), curate_manifest(Settings(value=1)), LOCAL)
    with pytest.raises(ConfigError, match=r"datasets\[x\].path: .* is a curate job's manifest; expected encode"):
        read_upstream(str(tmp_path), LOCAL, job="encode", field="datasets[x].path")
    (tmp_path / "manifest.json").write_text('{"job": "curate", "outputs": {"curated": []}}')  # hand-made, incomplete
    with pytest.raises(ConfigError, match="input: .* is not a job manifest this version reads"):
        read_upstream(str(tmp_path), LOCAL, job="curate")
    assert is_reusable(str(tmp_path), Settings(value=1)) is None


def _rows(n: int, source: str, **extra) -> list[dict]:
    return [{"key": f"{source}/0/{i}", "source": source, "shard": "0", "sample_id": str(i), "caption": "c",
             "source_weight": 0.5, "schema_version": SCHEMA_VERSION, **extra} for i in range(n)]


def test_adopted_parts_read_as_a_job_output(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    storage = s3_server.storage
    part = f"s3://{bucket}/in/part-0.parquet"
    st.write_parquet_atomic(conform(pa.Table.from_pylist(_rows(3, "a") + _rows(2, "b")), CURATED_SAMPLE), part, storage)
    adopt_parts(f"s3://{bucket}/in", [part], storage)
    curated = read_upstream(f"s3://{bucket}/in", storage, job="curate")
    assert curated.outputs.curated == [part] and curated.source_weights == {"a": 0.5, "b": 0.5}
    assert {s: c.kept for s, c in curated.counts.items()} == {"a": 3, "b": 2}

    triplets = str(tmp_path / "triplets" / "part-0.parquet")
    rows = _rows(2, "a", image_synthetic=True, caption_synthetic=False, audio_synthetic=False)
    st.write_parquet_atomic(conform(pa.Table.from_pylist(rows), TRIPLET_SAMPLE), triplets, LOCAL)
    adopt_parts(str(tmp_path / "triplets"), [triplets], LOCAL, job="synthesize")
    synthesized = read_upstream(str(tmp_path / "triplets"), LOCAL, job="synthesize")
    assert synthesized.counts["a"].generated == {"image": 2, "caption": 0, "audio": 0}


def test_toy_curation_check_counts_only_defects_a_source_holds(tmp_path):
    """An image-audio source keeps no caption: its planted caption mismatches are not in its data."""
    from jobs.curate import CurateConfig
    from shapesworld import checks
    from shapesworld.defects import make_records

    source = {"type": "shapesworld", "name": "pairs", "samples": 40, "defect_rate": 0.5, "seed": 3,
              "modalities": ["image", "audio"]}
    config = CurateConfig.model_validate({"output": str(tmp_path), "sources": [{"source": source}]})
    records = make_records(40, seed=3, defect_rate=0.5)
    write_manifest(str(tmp_path), CurateManifest.of(
        config, {}, inputs={"pairs": []}, run_id="r", counts={"pairs": {"input": 40, "kept": 0, "filtered": 40,
                                                                         "rejected": 0}},
        source_weights={"pairs": 0.0}, outputs={"curated": [], "rejects": None}), LOCAL)
    found = checks.curation(str(tmp_path))["pairs"]
    in_data = [r for r in records if r["defect"] and not r["defect"].endswith("_caption")]
    assert found["mismatched"] == 0 and found["mismatched_removed"] is None  # nothing kept: all removed
    assert found["clean"] == 40 - len(in_data) and found["clean_kept"] == 0.0 and found["defects_removed"] == 1.0
