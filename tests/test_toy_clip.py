"""The toy CLIP, aesthetic head and audio tower: trained on ShapesWorld, cached, loaded like
released weights, and scoring through the Ray Data stages exactly as in-process."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omniflow.codecs.media import decode_image
from omniflow.scoring.aesthetic import LAION_KEYS, load_aesthetic_head
from omniflow.scoring.clip import load_clip
from pipelines.scorers import ClipScoringConfig, add_clip_scoring
from shapesworld import make_records
from shapesworld.toy.__main__ import main as toy_main
from shapesworld.toy.clip import (
    ToyClipConfig,
    build_toy_clip,
    clip_separation,
    toy_scoring_configs,
)

TINY = {
    "train_samples": 40, "defect_samples": 8, "eval_samples": 10, "steps": 2, "batch_size": 8,
    "aesthetic": {"train_samples": 20, "eval_samples": 10, "steps": 2},
    "audio_tower": {"train_samples": 20, "eval_samples": 10, "steps": 2, "batch_size": 8},
}


def test_matched_pairs_outscore_mismatched_ones(toy_clip):
    out, manifest = toy_clip
    print(json.dumps(manifest["clip_eval"]), manifest["seconds"])
    assert manifest["clip_eval"]["auc"] >= 0.98
    # again on other held-out scenes, through the ordinary loader
    clip_config, _ = toy_scoring_configs(out)
    fresh = clip_separation(load_clip(clip_config), 300, seed=1234, image_size=32)
    print("fresh scenes", json.dumps(fresh))
    assert fresh["auc"] >= 0.98 and fresh["per_image"] >= 0.97


def test_aesthetic_head_separates_clean_from_blank_and_noise(toy_clip):
    _, manifest = toy_clip
    result = manifest["aesthetic_eval"]
    print(json.dumps(result))
    assert result["auc"] >= 0.99 and result["accuracy"] >= 0.97
    assert result["clean_mean"] - result["defect_mean"] >= 3.0


def test_toy_models_are_stored_like_released_weights(toy_clip):
    out, manifest = toy_clip
    clip_config, aesthetic_config = toy_scoring_configs(out)
    assert clip_config.model_name == "shapesworld-clip" and clip_config.pretrained.endswith(".safetensors")
    assert set(load_file(aesthetic_config.weights)) == set(LAION_KEYS["v2"])
    head, clip = load_aesthetic_head(aesthetic_config), load_clip(clip_config)
    assert clip.embed_dim == manifest["embed_dim"] == head.layers[0].in_features


def test_cache_reuses_and_rebuilds_on_change(tmp_path, one_thread):
    out, messages = tmp_path / "clip", []
    first = build_toy_clip(out, ToyClipConfig.model_validate(TINY), log=messages.append)
    stamp = (out / "clip.json").stat().st_mtime_ns
    assert build_toy_clip(out, ToyClipConfig.model_validate(TINY), log=messages.append) == first
    assert (out / "clip.json").stat().st_mtime_ns == stamp and any("up to date" in m for m in messages)
    changed = ToyClipConfig.model_validate({**TINY, "seed": 1})
    rebuilt = build_toy_clip(out, changed, log=messages.append)
    assert rebuilt["config_hash"] == changed.digest() != first["config_hash"]
    assert any("rebuilding" in m for m in messages) and not (tmp_path / "clip.partial").exists()


def test_cli_builds_and_prints_separation(tmp_path, capsys, one_thread):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = str(tmp_path / "clip")
    assert toy_main(["build-clip", "--out", out, "--config", str(tmp_path / "tiny.yaml"), "--threads", "1"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"clip_auc", "aesthetic_auc", "audio_tower_auc"}
    (tmp_path / "bad.yaml").write_text("stpes: 3\n")
    assert toy_main(["build-clip", "--out", out, "--config", str(tmp_path / "bad.yaml")]) == 2


def test_ray_data_scores_equal_the_in_process_forward(toy_clip, ray_cluster):
    """ShapesWorld rows (with a rejected row, a null caption and an undecodable image) through
    ClipPreprocess -> ClipScorer actors on a local Ray cluster give the bare forward's scores."""
    import ray

    out, _ = toy_clip
    clip_config, aesthetic_config = toy_scoring_configs(out)
    defects = ("mismatched_caption", "blank_image", "garbage_image")
    records = make_records(12, seed=7, defect_rate=0.5, defects=defects)
    rows = [
        {"key": str(i), "image": r["image"], "caption": None if i == 1 else r["caption"], "reject_stage": None,
         "reject_reason": "caption too long" if i == 2 else None}
        for i, r in enumerate(records)
    ]
    config = ClipScoringConfig(
        clip=clip_config, aesthetic=aesthetic_config,
        preprocess={"batch_size": 5, "num_cpus": 0.5}, scorer={"batch_size": 4, "num_cpus": 0.5},
    )
    scored = add_clip_scoring(ray.data.from_items(rows), config).take_all()
    scored = sorted(scored, key=lambda r: int(r["key"]))

    clip, head = load_clip(clip_config), load_aesthetic_head(aesthetic_config)
    garbage = [i for i, r in enumerate(records) if r["defect"] == "garbage_image"]
    assert garbage and all(scored[i]["reject_stage"] == "score" for i in garbage)
    for i, (record, row) in enumerate(zip(records, scored)):
        if i == 2 or i in garbage:
            assert row["clip_score"] is None and row["aesthetic_score"] is None
            continue
        with torch.inference_mode():
            embeds = clip.embed_images(clip.preprocess(decode_image(record["image"]))[None])
            aesthetic = head(embeds).item()
            similarity = clip.similarity(embeds, clip.embed_texts([record["caption"]])).item()
        assert row["aesthetic_score"] == pytest.approx(aesthetic, rel=1e-4, abs=1e-4)
        assert row["clip_score"] is None if i == 1 else row["clip_score"] == pytest.approx(similarity, abs=1e-5)
    assert "clip_pixels" not in scored[0]


def test_toy_clip_as_pooled_encoders(toy_clip):
    """The toy CLIP's image and text towers as pooled-vector encoders (the open-clip-*-pooled
    kinds): zero-padded to the pooled width, images closest to captions of their concept, the image
    vector equal to the scorer's embedding of the same pixels."""
    from omniflow.codecs import build_codec, read_codec_set
    from omniflow.modality import Modality
    from shapesworld.toy.clip import toy_pooled_configs

    out, _ = toy_clip
    assert toy_pooled_configs(out)[Modality.IMAGE]["pooled_dim"] == 64  # the CLIP's own width
    # the build is a codec set: what a job's `codec_sets` reads is what toy_pooled_configs gives
    assert read_codec_set(out) == {"codecs": {}, "pooled": {m.value: c for m, c in toy_pooled_configs(out).items()}}
    configs = toy_pooled_configs(out, 80)
    image, text = build_codec(configs[Modality.IMAGE]), build_codec(configs[Modality.TEXT])
    assert (image.modality, text.modality) == (Modality.IMAGE, Modality.TEXT)
    records = make_records(12, seed=77)
    images = image.embed([decode_image(r["image"]) for r in records])
    texts = text.embed([r["caption"] for r in records])
    assert images.shape == texts.shape == (12, 80)
    assert torch.all(images[:, 64:] == 0) and torch.allclose(images[:, :64].norm(dim=1), torch.ones(12), atol=1e-4)
    concepts = [(r["colour"], r["shape"]) for r in records]
    best = (images @ texts.T).argmax(dim=1).tolist()
    assert sum(concepts[j] == concepts[i] for i, j in enumerate(best)) >= 11
    clip = load_clip(toy_scoring_configs(out)[0])
    direct = clip.embed_images(torch.stack([clip.preprocess(decode_image(r["image"])) for r in records]))
    assert torch.allclose(images[:, :64], direct, atol=1e-5)
    with pytest.raises(ValueError, match="pretrained"):
        build_codec({k: v for k, v in configs[Modality.TEXT].items() if k != "pretrained"})


def test_audio_tower_vectors_sit_in_the_text_space(toy_clip):
    """The audio tower (the mel-vit-audio-pooled kind, a CLIPVisionModelWithProjection saved with
    save_pretrained) puts a clip nearest the toy CLIP's captions of its own concept, reads encoded
    bytes and (wave, rate) at another rate alike, and pads to the pooled width."""
    import numpy as np
    from transformers import CLIPVisionModelWithProjection

    from omniflow.codecs import build_codec
    from omniflow.codecs.media import decode_audio, resample
    from omniflow.modality import Modality
    from shapesworld.toy.clip import toy_pooled_configs

    out, manifest = toy_clip
    assert manifest["audio_tower_eval"]["auc"] > 0.95
    config = toy_pooled_configs(out, 80)[Modality.AUDIO]
    assert isinstance(CLIPVisionModelWithProjection.from_pretrained(config["path"]), CLIPVisionModelWithProjection)
    audio, text = build_codec(config), build_codec(toy_pooled_configs(out, 80)[Modality.TEXT])
    assert audio.modality == Modality.AUDIO
    records = make_records(12, seed=78)
    clips = audio.embed([r["audio"] for r in records])
    assert clips.shape == (12, 80) and torch.all(clips[:, 64:] == 0)
    assert torch.allclose(clips[:, :64].norm(dim=1), torch.ones(12), atol=1e-4)
    concepts = [(r["colour"], r["shape"]) for r in records]
    best = (clips @ text.embed([r["caption"] for r in records]).T).argmax(dim=1).tolist()
    assert sum(concepts[j] == concepts[i] for i, j in enumerate(best)) >= 11
    wave, rate = decode_audio(records[0]["audio"])
    again = audio.embed([(resample(np.asarray(wave, dtype=np.float32), rate, 22_050), 22_050)])
    assert float(again[0] @ clips[0]) > 0.95
