"""The encode job end to end on a real local Ray cluster: latents, rejects, counts, S3, resume.

Codecs are tiny random (untrained) models of the real classes, saved and loaded through the same
code as real checkpoints; the input is a fake curate / synthesize output of ShapesWorld rows with
absent modalities and planted bad media.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.encode import EncodeConfig, main, run
from omniflow import storage as st
from omniflow.codecs.autoencoder import new_autoencoder_kl
from omniflow.codecs.media import MediaError
from omniflow.codecs.mel import TOY_MEL
from omniflow.codecs.text_vae_train import build_tiny_text_vae
from omniflow.config import ConfigError, load_config
from omniflow.modality import Modality
from pipelines.latents import latent_layout, latents_to_tensors, read_latents
from pipelines.manifest import adopt_parts
from pipelines.schema import CURATED_SAMPLE, DROPPED_SAMPLE, SCHEMA_VERSION, TRIPLET_SAMPLE, conform
from shapesworld import make_records
from shapesworld.toy.codecs import load_toy_codecs

ROWS = 480


@pytest.fixture(scope="module")
def codecs_dir(tmp_path_factory) -> Path:
    """Random tiny image / mel / text codecs with a codecs.json as `build_toy_codecs` writes it."""
    root = tmp_path_factory.mktemp("codecs")
    new_autoencoder_kl(channels=3, block_out_channels=(8, 16), sample_size=32).save_pretrained(root / "image_vae")
    new_autoencoder_kl(channels=1, block_out_channels=(8, 16), sample_size=128).save_pretrained(root / "audio" / "vae")
    captions = [r["caption"] for r in make_records(60, seed=0)]
    build_tiny_text_vae(captions, num_queries=4, latent_dim=8, width=32, num_layers=1).save_pretrained(root / "text_vae")
    codecs = {
        "image": {"kind": "image-vae", "path": "image_vae", "resolution": 32},
        "audio": {"kind": "mel-vae", "path": "audio", "mel": TOY_MEL.model_dump(), "griffin_lim_iters": 2},
        "text": {"kind": "omniflow-text-vae", "path": "text_vae"},
    }
    (root / "codecs.json").write_text(json.dumps({"codecs": codecs, "latent_shapes": {}}))
    return root


def _rows(n: int, seed: int, *, synthetic: bool) -> list[dict]:
    """ShapesWorld rows with every third image, every fifth caption and every seventh audio absent,
    one undecodable image and one silent (unusable) clip."""
    rows = []
    for i, r in enumerate(make_records(n, seed=seed)):
        row = {
            "key": f"shapes/part-{seed}/{i}", "source": "shapes" if i % 4 else "other", "shard": f"part-{seed}",
            "sample_id": r["id"], "image": None if i % 3 == 1 else r["image"], "caption": None if i % 5 == 2 else r["caption"],
            "audio": None if i % 7 == 3 else r["audio"], "source_weight": 0.5 if i % 4 else 2.0,
            "schema_version": SCHEMA_VERSION,
        }
        if synthetic:
            row.update(image_synthetic=i % 2 == 0, caption_synthetic=False, audio_synthetic=i % 3 == 0)
        rows.append(row)
    rows[0]["image"] = b"\x89PNG\r\n not really an image"
    rows[5]["audio"] = make_records(1, seed=0, defect_rate=1.0, defects=["silent_audio"])[0]["audio"]
    return rows


def write_input(out: str, storage: st.StorageConfig, *, n: int = ROWS, parts: int = 2, synthetic: bool = False) -> list[dict]:
    """A fake curate (or synthesize) output under `out`: parts plus manifest.json. Returns the rows."""
    schema = TRIPLET_SAMPLE if synthetic else CURATED_SAMPLE
    all_rows, paths = [], []
    for p in range(parts):
        rows = _rows(n // parts, seed=p, synthetic=synthetic)
        path = st.join(out, "curated", f"part-{p}.parquet")
        st.write_parquet_atomic(conform(pa.Table.from_pylist(rows), schema), path, storage)
        all_rows += rows
        paths.append(path)
    adopt_parts(out, paths, storage, job="synthesize" if synthetic else "curate")
    return all_rows


def _expected(rows: list[dict], codecs_dir: Path, modalities=("image", "text", "audio")) -> dict[str, dict | None]:
    """Each row's latents from the codecs called directly, one row at a time; None where the
    codecs refuse the row's media (the job must reject it)."""
    codecs = load_toy_codecs(codecs_dir)
    out = {}
    for row in rows:
        got = {}
        try:
            for modality, media in (("image", "image"), ("text", "caption"), ("audio", "audio")):
                codec = codecs[Modality(modality)]
                if modality in modalities and row[media] is not None:
                    inputs = [row[media]] if modality == "text" else codec.preprocess([row[media]])
                    got[f"{modality}_latent"] = codec.encode(inputs)[0]
        except MediaError:
            got = None
        out[row["key"]] = got
    return out


def _check_counts(manifest: dict, expected: dict) -> None:
    total = {"input": 0, "encoded": 0, "rejected": 0}
    for counts in manifest["counts"].values():
        assert counts["input"] == counts["encoded"] + counts["rejected"]
        for k in total:
            total[k] += counts[k]
    assert total["input"] == len(expected)
    assert total["rejected"] == sum(e is None for e in expected.values()) > 0


def _check_against_direct(table: pa.Table, expected: dict, *, atol: float, rtol: float = 0.0) -> None:
    tensors = latents_to_tensors(table)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(k for k, e in expected.items() if e is not None)
    for i, key in enumerate(keys):
        for modality in ("image", "text", "audio"):
            column = f"{modality}_latent"
            present = column in expected[key]
            assert bool(tensors[f"has_{modality}"][i]) == present
            if present:
                torch.testing.assert_close(tensors[column][i].float(), expected[key][column].float(), atol=atol, rtol=rtol)
            elif column in tensors:
                assert not tensors[column][i].any()


SETTINGS = {"rows_per_shard": 8, "decode": {"batch_size": 8, "num_cpus": 0.5}, "encoder": {"batch_size": 8, "num_cpus": 1}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, codecs_dir, toy_clip, ray_cluster) -> tuple[dict, list[dict], dict]:
    """One uninterrupted float32 run on a local curate output, with the toy CLIP's pooled image and
    text vectors: (settings, input rows, manifest)."""
    root = tmp_path_factory.mktemp("encode")
    rows = write_input(str(root / "curated"), st.StorageConfig(), n=ROWS, parts=4)
    settings = {"input": str(root / "curated"), "output": str(root / "out"), "codec_sets": [str(codecs_dir), str(toy_clip[0])], **SETTINGS}
    return settings, rows, run(EncodeConfig.model_validate(settings))


@pytest.fixture(scope="module")
def expected(uninterrupted, codecs_dir) -> dict:
    """The uninterrupted run's rows encoded by the codecs directly."""
    return _expected(uninterrupted[1], codecs_dir)


def test_local_run_latents_match_the_codecs(uninterrupted, expected):
    settings, rows, manifest = uninterrupted
    _check_counts(manifest, expected)
    assert json.loads((Path(settings["output"]) / "manifest.json").read_text())["counts"] == manifest["counts"]
    assert manifest["latents"]["shapes"] == {"image_latent": [4, 16, 16], "text_latent": [4, 8], "audio_latent": [4, 64, 32],
                                             "pooled_image": [64], "pooled_text": [64], "pooled_audio": [64]}
    assert manifest["modalities"] == {"encoded": ["image", "text", "audio"], "left_out": []}
    parts = manifest["outputs"]["latents"]
    assert len(parts) >= 20 and all(pq.read_metadata(p).num_rows <= 16 for p in parts)

    table = pq.read_table(parts)  # plain pyarrow reads the parts
    layout = latent_layout(table.schema)
    assert layout.dtype == "float32" and layout.codec_hash == manifest["latents"]["codec_config_hash"]
    assert set(table.column("source_weight").to_pylist()) == {0.5, 2.0}
    assert not any(table.column("image_synthetic").to_pylist())
    by_key = {r["key"]: r for r in rows}
    assert all(by_key[k]["caption"] == c for k, c in zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    _check_against_direct(table, expected, atol=1e-4)

    rejects = pq.read_table(manifest["outputs"]["rejects"])
    assert rejects.schema.equals(DROPPED_SAMPLE, check_metadata=False)
    reasons = dict(zip(rejects.column("key").to_pylist(), zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist())))
    assert reasons["shapes/part-0/0"][0] == "decode" and "image could not be decoded" in reasons["shapes/part-0/0"][1]
    assert reasons["shapes/part-0/5"][0] == "decode" and "silent" in reasons["shapes/part-0/5"][1]

    # What training reads: Ray Data pyarrow batches of the same parts.
    import ray

    batches = list(ray.data.read_parquet(parts).iter_batches(batch_size=7, batch_format="pyarrow"))
    assert sum(latents_to_tensors(b)["image_latent"].shape[0] for b in batches) == table.num_rows


def test_pooled_vectors_are_the_encoders_own(uninterrupted, codecs_dir, toy_clip):
    """Each row's pooled vectors are what the toy CLIP (image, text) and its audio tower give for
    the same inputs the codecs read; a row without the modality holds zeros there."""
    from omniflow.codecs import build_codec
    from omniflow.codecs.pooled import pooled_inputs
    from shapesworld.toy.clip import toy_pooled_configs

    _settings, rows, manifest = uninterrupted
    assert set(manifest["pooled"]) == {"image", "text", "audio"}
    table = pq.read_table(manifest["outputs"]["latents"])
    tensors = latents_to_tensors(table)
    by_key = {r["key"]: r for r in rows}
    codecs = load_toy_codecs(codecs_dir)
    encoders = {m: build_codec(c) for m, c in toy_pooled_configs(toy_clip[0]).items()}
    for i, key in enumerate(table.column("key").to_pylist()[:40]):
        row = by_key[key]
        for modality, media in ((Modality.IMAGE, row["image"]), (Modality.TEXT, row["caption"]),
                                (Modality.AUDIO, row["audio"])):
            got = tensors[f"pooled_{modality.value}"][i]
            if media is None:
                assert not got.any()
                continue
            inputs = [media] if modality == Modality.TEXT else codecs[modality].preprocess([media])
            rate = codecs[Modality.AUDIO].sample_rate if modality == Modality.AUDIO else None
            want = encoders[modality].embed(pooled_inputs(modality, inputs, rate))[0]
            torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=0)
            assert abs(float(want.norm()) - 1) < 1e-3  # unit embeddings, not zeros


def test_rerun_skips_everything_and_drops_duplicate_parts(uninterrupted, tmp_path):
    """Parts as retried write tasks leave them: one committed twice under two names, and one whose
    first attempt rejected rows that its retry encoded. Each key ends in one output, encoded rows
    over their rejects; a second rerun changes nothing."""
    settings, rows, manifest = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(settings["output"], out)
    part, other = sorted((out / "latents").glob("part-*.parquet"))[:2]
    shutil.copy(part, part.with_name("part-copy.parquet"))
    failed = pq.read_table(other, columns=["key", "source", "sample_id"]).slice(0, 3)
    n = failed.num_rows
    failed = failed.append_column("status", pa.array(["rejected"] * n)).append_column(
        "stage", pa.array(["encode"] * n)).append_column("reason", pa.array(["worker lost"] * n))
    pq.write_table(conform(failed.append_column("schema_version", pa.array([SCHEMA_VERSION] * n, pa.int16())),
                           DROPPED_SAMPLE), out / "rejects" / "part-first-attempt.parquet")
    config = EncodeConfig.model_validate({**settings, "output": str(out)})
    again = run(config)
    assert again["resumed_rows"] == len(rows) and again["duplicate_rows_dropped"] == pq.read_metadata(part).num_rows + n
    assert again["counts"] == manifest["counts"] and "encoding" in again["timings"]
    keys = pq.read_table(again["outputs"]["latents"], columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == sum(c["encoded"] for c in manifest["counts"].values())
    rejected = pq.read_table(again["outputs"]["rejects"], columns=["key", "reason"])
    assert not set(keys) & set(rejected.column("key").to_pylist()) and "worker lost" not in rejected.column("reason").to_pylist()
    assert len(keys) + rejected.num_rows == len(rows)
    files = {p: Path(p).read_bytes() for kind in ("latents", "rejects") for p in again["outputs"][kind]}
    third = run(config)
    assert third["duplicate_rows_dropped"] == 0 and third["outputs"] == again["outputs"]
    assert {p: Path(p).read_bytes() for p in files} == files
    with pytest.raises(ValueError, match="float16 latents"):
        run(EncodeConfig.model_validate({**settings, "output": str(out), "dtype": "float16"}))


def test_killed_run_resumes_without_loss_or_duplication(uninterrupted, expected, tmp_path):
    """SIGKILL the job (a subprocess on the session's cluster) after its first parts land, rerun
    it, compare with the uninterrupted run. This run stores float16."""
    import ray

    settings, rows, straight = uninterrupted
    settings = {**settings, "output": str(tmp_path / "killed"), "dtype": "float16"}
    config = tmp_path / "encode.json"
    config.write_text(json.dumps(settings))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-m", "jobs.encode", "--config", str(config)], env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latents = tmp_path / "killed" / "latents"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(latents.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.2)  # until Ray has ended the dead driver's workers: none of them writes any more
    assert len(list(latents.glob("part-*.parquet"))) >= 2 and not (tmp_path / "killed" / "manifest.json").exists()

    a = run(EncodeConfig.model_validate(settings))  # the rerun, in this process
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["counts"] == a["counts"]
    print(f"{a['resumed_rows']} of {len(rows)} rows were written before the kill")
    assert 0 < a["resumed_rows"] < len(rows) and a["duplicate_rows_dropped"] == 0
    assert a["counts"] == straight["counts"]

    def keys(manifest: dict, kind: str) -> list[str]:
        return sorted(k for p in manifest["outputs"][kind] for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())

    for kind in ("latents", "rejects"):
        assert keys(a, kind) == keys(straight, kind)
    assert len(keys(a, "latents")) + len(keys(a, "rejects")) == len(rows) == len(set(keys(a, "latents") + keys(a, "rejects")))
    table = read_latents(a["outputs"]["latents"], st.StorageConfig())
    assert latents_to_tensors(table)["audio_latent"].dtype == torch.float16
    _check_against_direct(table, expected, atol=1e-3, rtol=1e-3)


def test_s3_bfloat16_from_a_synthesize_output_without_audio(s3_server, codecs_dir, ray_cluster):
    storage = s3_server.storage
    bucket = s3_server.new_bucket()
    rows = write_input(f"s3://{bucket}/triplets", storage, n=24, parts=1, synthetic=True)
    # the input lists its one part twice under two names, as a retried upstream write can leave it
    listed = json.loads(st.read_bytes(f"s3://{bucket}/triplets/manifest.json", storage))
    copy = f"s3://{bucket}/triplets/curated/part-0-again.parquet"
    st.write_bytes_atomic(copy, st.read_bytes(listed["outputs"]["triplets"][0], storage), storage)
    listed["outputs"]["triplets"].append(copy)
    st.write_bytes_atomic(f"s3://{bucket}/triplets/manifest.json", json.dumps(listed).encode(), storage)
    codecs = json.loads((codecs_dir / "codecs.json").read_text())["codecs"]
    config = EncodeConfig.model_validate({
        "input": f"s3://{bucket}/triplets", "output": f"s3://{bucket}/latents", "dtype": "bfloat16", **SETTINGS,
        "codecs": {m: {**c, "path": str(codecs_dir / c["path"])} for m, c in codecs.items() if m != "audio"},
        "storage": {"endpoint_url": s3_server.endpoint_url, "region": "us-east-1"},
    })
    manifest = run(config)
    expected = _expected(rows, codecs_dir, modalities=("image", "text"))
    _check_counts(manifest, expected)  # without an audio codec, the silent clip rejects nothing
    assert sum(e is None for e in expected.values()) == 1
    assert manifest["input"]["job"] == "synthesize" and manifest["latents"]["storage_type"] == "uint16"
    assert manifest["input_duplicate_keys"] == 24 and manifest["duplicate_rows_dropped"] == 24
    assert manifest["modalities"] == {"encoded": ["image", "text"], "left_out": ["audio"]}
    assert all(p.startswith("s3://") for p in manifest["outputs"]["latents"] + manifest["outputs"]["rejects"])

    table = read_latents(manifest["outputs"]["latents"], storage)
    assert "audio_latent" not in table.column_names and not any(table.column("has_audio").to_pylist())
    tensors = latents_to_tensors(table)
    assert tensors["image_latent"].dtype == torch.bfloat16 and tensors["text_latent"].dtype == torch.bfloat16
    by_key = {r["key"]: r for r in rows}
    for flag in ("image_synthetic", "audio_synthetic"):
        assert table.column(flag).to_pylist() == [by_key[k][flag] for k in table.column("key").to_pylist()]
    _check_against_direct(table, expected, atol=1e-2, rtol=1e-2)


def test_stages_reject_bad_rows_with_their_reason(codecs_dir):
    """The two stages called directly (as Ray calls them): undecodable or too elongated media are
    rejected at decode; a row whose latents come out non-finite is rejected at encode, alone."""
    from omniflow.codecs.image import to_pixels
    from omniflow.codecs.media import encode_image
    from pipelines.encode import LatentEncoder, LatentPreprocess
    from pipelines.schema import tensor_column

    config = EncodeConfig.model_validate({"input": "x", "output": "y", "codec_sets": [str(codecs_dir)]}).encoding()
    rows = _rows(8, seed=0, synthetic=False)
    rows[2]["image"] = encode_image(np.full((4, 64, 3), 200, np.uint8))  # 16:1
    batch = conform(pa.Table.from_pylist(rows), CURATED_SAMPLE).select(["key", "source", "sample_id", "image", "caption",
                                                                         "audio", "source_weight"])
    prepared = LatentPreprocess(config.model_dump(mode="json"))(batch)
    reasons = prepared.column("reject_reason").to_pylist()
    assert "image could not be decoded" in reasons[0] and "max_image_aspect" in reasons[2] and "silent" in reasons[5]
    assert [r is None for r in reasons] == [False, True, False, True, True, False, True, True]
    assert prepared.column("has_image").to_pylist() == [r["image"] is not None for r in rows]
    pixels = prepared.column("image_pixels").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(pixels[3], to_pixels([rows[3]["image"]], 32)[0].numpy())

    waves = prepared.column("audio_wave").combine_chunks().to_numpy_ndarray().copy()
    waves[4] = np.nan  # as if a row slipped through with unusable samples
    prepared = prepared.set_column(prepared.column_names.index("audio_wave"), "audio_wave",
                                   tensor_column("audio_wave", waves, pa.float32()))
    encoded = LatentEncoder(config.model_dump(mode="json"))(prepared)
    stages, reasons = encoded.column("reject_stage").to_pylist(), encoded.column("reject_reason").to_pylist()
    assert stages[4] == "encode" and reasons[4] == "audio_latent: non-finite values in the output"
    assert [r is None for r in reasons] == [False, True, False, True, False, False, True, True]
    assert "image_pixels" not in encoded.column_names and encoded.column("audio_latent").null_count == 5


def test_bad_config_names_the_field(tmp_path, codecs_dir, capsys):
    base = [f"input={tmp_path}", f"output={tmp_path / 'out'}"]
    sets = f"codec_sets=[{codecs_dir}]"
    with pytest.raises(ConfigError, match="codecs.image is set both here and by codec set"):
        load_config(EncodeConfig, None, [*base, sets, "codecs={image: {kind: image-vae, path: x}}"])
    with pytest.raises(ConfigError, match="codecs.image.kind"):
        load_config(EncodeConfig, None, [*base, "codecs={image: {kind: mel-vae, path: x}}"])
    with pytest.raises(ConfigError, match="pooled.audio needs codecs.audio"):
        load_config(EncodeConfig, None, [*base, "codecs={image: {kind: image-vae, path: x}}",
                                         "pooled={audio: {kind: clap-audio-pooled, path: x}}"])
    with pytest.raises(ConfigError, match="dtype"):
        load_config(EncodeConfig, None, [*base, sets, "dtype=int8"])
    with pytest.raises(ConfigError, match="codec_sets: .* has no codecs.json: not a codec set directory"):
        load_config(EncodeConfig, None, [*base, f"codec_sets=[{tmp_path}]"])
    with pytest.raises(ConfigError, match="codec_sets"):
        load_config(EncodeConfig, None, [*base, "codec_sets=3"])
    config = load_config(EncodeConfig, None, [*base, sets])
    assert set(config.codecs) == {Modality.IMAGE, Modality.TEXT, Modality.AUDIO} and not config.pooled
    assert EncodeConfig.model_validate(config.model_dump(mode="json")) == config  # as a manifest records it
    assert main([*base, "codecs={}"]) == 2
    assert "codecs" in capsys.readouterr().err
