"""Shared test setup: no hub access, deterministic CPU threads."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["s3_server"]

import pytest
import torch

from omniflow.presets import build_transformer


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer("tiny").eval()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads and lose much when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster (2 CPUs) shared by the session's tests, started the way jobs start one.

    It starts after the S3 fixture: Ray workers take their S3 credentials from the environment
    they inherit, so the server's (fake) credentials must exist first.
    """
    import ray

    from pipelines.runtime import init_ray

    init_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """One directory for the session's toy models, laid out as `runs/toy/` (clip/, codecs/)."""
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="session")
def toy_models(toy_dir) -> tuple[dict, dict]:
    """The default toy CLIP and toy codecs, built once per session side by side as the demo builds
    them (about 4 minutes on 2 CPU cores): their manifests (clip, codecs)."""
    from shapesworld.toy.models import build_toy_models

    return build_toy_models(toy_dir, workers=2)


@pytest.fixture(scope="session")
def toy_codecs(toy_dir, toy_models):
    """The session's toy codecs: their directory and manifest."""
    return toy_dir / "codecs", toy_models[1]


@pytest.fixture(scope="session")
def toy_clip(toy_dir, toy_models):
    """The session's toy CLIP, aesthetic head and audio tower: their directory and manifest."""
    return toy_dir / "clip", toy_models[0]


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory, toy_codecs):
    """A model directory of a random toy transformer with the session's toy codecs, exported from a
    training checkpoint as `jobs.train` exports one."""
    from omniflow.model_dir import (
        export_checkpoint,
        load_training_checkpoint,
        save_training_checkpoint,
        transformer_config,
    )
    from shapesworld.toy.codecs import toy_codec_configs

    codecs_dir, _ = toy_codecs
    torch.manual_seed(0)
    model = build_transformer("toy")
    root = tmp_path_factory.mktemp("toy_model")
    info = {"preset": "toy", "latent_shapes": {"image": [4, 8, 8], "text": [8, 32], "audio": [4, 32, 16]},
            "codecs": toy_codec_configs(codecs_dir), "pooled": {}}
    save_training_checkpoint(root / "checkpoint", model_state=model.state_dict(), model_config=transformer_config(model),
                             step=1, model_info=info)
    return export_checkpoint(load_training_checkpoint(root / "checkpoint"), root / "model", use_ema=False)


@pytest.fixture(scope="session")
def clap_dir(tmp_path_factory):
    """A tiny random CLAP with its feature extractor and a tiny RoBERTa tokenizer, saved as
    `from_pretrained` reads a real one."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    root = tmp_path_factory.mktemp("clap")
    torch.manual_seed(0)
    config = ClapConfig(
        text_config={
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 40,
        },
        audio_config={
            "hidden_size": 16, "patch_embeds_hidden_size": 8, "depths": [1, 1], "num_attention_heads": [1, 2],
            "window_size": 4, "spec_size": 64, "num_mel_bins": 64, "patch_stride": [4, 4], "enable_fusion": False,
        },
        projection_dim=8,
    )
    ClapModel(config).save_pretrained(root)
    ClapFeatureExtractor(
        feature_size=64, sampling_rate=48000, max_length_s=1, hop_length=960, nb_max_samples=48000,
        truncation="rand_trunc",
    ).save_pretrained(root)
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "\u0120", *"abcdefghijklmnopqrstuvwxyz"]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root)
    return root
