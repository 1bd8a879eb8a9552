"""Scoring models (open_clip CLIP, LAION aesthetic heads, CLAP) and their Ray Data stages, called
in-process on tiny random models saved and loaded through the real loading code."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from omniflow.codecs.media import encode_audio, encode_image
from omniflow.scoring.aesthetic import (
    LAION_KEYS,
    load_aesthetic_head,
    new_aesthetic_head,
    save_aesthetic_head,
    train_aesthetic_head,
)
from omniflow.scoring.clap import load_clap
from omniflow.scoring.clip import ClipConfig, clip_transform, load_clip
from pipelines.scorers import (
    CLAP_FEATURES,
    CLIP_PIXELS,
    ClapPreprocess,
    ClapScorer,
    ClapScoringConfig,
    ClipPreprocess,
    ClipScorer,
    ClipScoringConfig,
    StageResources,
)

# ---- LAION aesthetic heads -------------------------------------------------------------------


def _laion_v2_state(width: int = 768) -> dict[str, torch.Tensor]:
    """A state dict laid out like sac+logos+ava1-l14-linearMSE.pth (nn.Sequential indices)."""
    g = torch.Generator().manual_seed(0)
    shapes = {0: (1024, width), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for i, (w_out, w_in) in shapes.items():
        state[f"layers.{i}.weight"] = torch.randn(w_out, w_in, generator=g) / w_in**0.5
        state[f"layers.{i}.bias"] = torch.randn(w_out, generator=g)
    return state


def test_v1_head_reads_the_laion_linear_layout(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"weight": torch.randn(1, 768, generator=g), "bias": torch.randn(1, generator=g)}
    path = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    torch.save(state, path)
    head = load_aesthetic_head({"version": "v1", "weights": path.as_uri()})  # file:// URL
    x = torch.randn(5, 768, generator=g) * 7
    expected = (x / x.norm(dim=-1, keepdim=True)) @ state["weight"].T + state["bias"]
    torch.testing.assert_close(head(x), expected.squeeze(-1))


def test_v2_head_reads_the_laion_mlp_layout_and_normalises(tmp_path):
    state = _laion_v2_state()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    head = load_aesthetic_head({"version": "v2", "weights": str(path)})
    x = torch.randn(4, 768, generator=torch.Generator().manual_seed(2))
    h = x / x.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # affine maps only: no activations, dropout off at inference
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(head(x), h.squeeze(-1))
    torch.testing.assert_close(head(3.5 * x), head(x))  # scale-invariant: the input is normalised


def test_heads_save_in_laion_layout_and_round_trip(tmp_path):
    for version, suffix in (("v1", ".pth"), ("v2", ".safetensors")):
        head = new_aesthetic_head(version, 32, seed=3).eval()
        path = tmp_path / f"head{suffix}"
        save_aesthetic_head(head, path)
        keys = load_file(path).keys() if suffix == ".safetensors" else torch.load(path, weights_only=True).keys()
        assert set(keys) == set(LAION_KEYS[version])
        x = torch.randn(3, 32)
        torch.testing.assert_close(load_aesthetic_head({"version": version, "weights": str(path)})(x), head(x))


def test_head_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        load_aesthetic_head({"version": "v2", "weights": str(tmp_path / "no-such.pth")})
    state = _laion_v2_state(16)
    del state["layers.7.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layers.7.bias'\]"):
        load_aesthetic_head({"version": "v2", "weights": str(tmp_path / "broken.pth")})
    with pytest.raises(ValueError, match="version"):
        load_aesthetic_head({"version": "v3", "weights": "x.pth"})


def test_train_aesthetic_head_fits_a_target():
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(256, 16, generator=g)
    direction = torch.randn(16, generator=g)
    targets = 5 + 2 * torch.nn.functional.normalize(embeds, dim=-1) @ direction
    head = new_aesthetic_head("v2", 16)
    losses = train_aesthetic_head(head, embeds, targets, steps=300, batch_size=64, lr=3e-3)
    assert np.mean(losses[-20:]) < 0.05 * np.mean(losses[:5])
    assert not head.training


# ---- open_clip -------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> ClipConfig:
    """A tiny open_clip model saved as a config JSON + safetensors checkpoint."""
    root = tmp_path_factory.mktemp("clip")
    (root / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    random = ClipConfig(model_name="tiny-clip", config_file=str(root / "tiny-clip.json"), pretrained=None)
    torch.manual_seed(0)
    save_file(load_clip(random).model.state_dict(), root / "open_clip_model.safetensors")
    return random.model_copy(update={"pretrained": str(root / "open_clip_model.safetensors")})


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32 + 8 * i, 40, 3), dtype=np.uint8) for i in range(n)]


def test_open_clip_loads_a_local_checkpoint(tiny_clip):
    clip = load_clip(tiny_clip)
    state = load_file(tiny_clip.pretrained)
    for name, value in clip.model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    from PIL import Image

    images = [Image.fromarray(a) for a in _images(3)]
    pixels = torch.stack([clip.preprocess(im) for im in images])
    assert pixels.shape == (3, 3, 32, 32)
    torch.testing.assert_close(pixels, torch.stack([clip_transform(tiny_clip)(im) for im in images]))
    image_embeds, text_embeds = clip.embed_images(pixels), clip.embed_texts(["a red circle", "x", "a blue square"])
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(3))
    tokens = clip.tokenizer(["a red circle", "x", "a blue square"])
    cosine = torch.nn.functional.cosine_similarity(clip.model.encode_image(pixels), clip.model.encode_text(tokens))
    torch.testing.assert_close(clip.similarity(image_embeds, text_embeds), cosine)


def test_open_clip_loads_a_local_dir(tiny_clip, tmp_path):
    """open_clip's `local-dir:` layout: open_clip_config.json (model and preprocess config) + weights."""
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    save_file(load_file(tiny_clip.pretrained), tmp_path / "open_clip_model.safetensors")
    config = ClipConfig(model_name=f"local-dir:{tmp_path}", pretrained=None)
    clip, reference = load_clip(config), load_clip(tiny_clip)
    from PIL import Image

    image = Image.fromarray(_images(1)[0])
    pixels = clip.preprocess(image)[None]
    torch.testing.assert_close(pixels, clip_transform(config)(image)[None])
    assert not torch.allclose(pixels, reference.preprocess(image)[None])  # its own mean and std
    torch.testing.assert_close(clip.embed_images(pixels), reference.embed_images(pixels))


def test_open_clip_config_errors(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="must match"):
        ClipConfig(model_name="other", config_file=tiny_clip.config_file)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a tag"):
        load_clip(tiny_clip.model_copy(update={"pretrained": str(tmp_path / "missing.safetensors")}))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):  # HF_HUB_OFFLINE: no download
        load_clip(ClipConfig(model_name="ViT-B-32", pretrained="openai"))
    with pytest.raises(ValueError, match="hf-hub"):
        ClipConfig(model_name="hf-hub:laion/CLIP-ViT-L-14", pretrained=None)


# ---- CLIP stages, called in-process ----------------------------------------------------------


def _batch(images: list, captions: list, rejected: list) -> pa.Table:
    return pa.table({
        "key": [str(i) for i in range(len(images))],
        "image": pa.array(images, pa.binary()),
        "caption": pa.array(captions, pa.string()),
        "audio": pa.nulls(len(images), pa.binary()),
        "reject_stage": pa.array(["decode" if r else None for r in rejected], pa.string()),
        "reject_reason": pa.array(["bad bytes" if r else None for r in rejected], pa.string()),
    })


def test_clip_stages_score_live_rows_and_reject_bad_images(tiny_clip, tmp_path):
    head = new_aesthetic_head("v2", 16, seed=1).eval()
    save_aesthetic_head(head, tmp_path / "head.pth")
    config = ClipScoringConfig(clip=tiny_clip, aesthetic={"version": "v2", "weights": str(tmp_path / "head.pth")})
    encoded = [encode_image(a) for a in _images(5)]
    batch = _batch(
        images=[encoded[0], encoded[1], None, b"not an image", encoded[3], encoded[4]],
        captions=["a red circle", None, "a caption", "a caption", "blue", "green"],
        rejected=[False, False, False, False, False, True],
    )
    pixels = ClipPreprocess(config.model_dump(mode="json"))(batch)
    assert pixels.column(CLIP_PIXELS).type.shape == [3, 32, 32]
    out = ClipScorer(config.model_dump(mode="json"))(pixels)
    assert CLIP_PIXELS not in out.column_names and out.num_rows == 6
    assert out.column("reject_stage").to_pylist() == [None, None, None, "score", None, "decode"]
    assert out.column("reject_reason").to_pylist()[3].startswith("image could not be decoded")

    clip = load_clip(tiny_clip)
    from omniflow.codecs.media import decode_image

    with torch.inference_mode():
        embeds = clip.embed_images(torch.stack([clip.preprocess(decode_image(encoded[i])) for i in (0, 1, 3)]))
        expected_clip = clip.similarity(embeds[[0, 2]], clip.embed_texts(["a red circle", "blue"]))
        expected_aesthetic = head(embeds)
    clip_scores, aesthetic_scores = out.column("clip_score").to_pylist(), out.column("aesthetic_score").to_pylist()
    assert [s is None for s in clip_scores] == [False, True, True, True, False, True]
    assert [s is None for s in aesthetic_scores] == [False, False, True, True, False, True]
    np.testing.assert_allclose([clip_scores[0], clip_scores[4]], expected_clip, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([aesthetic_scores[i] for i in (0, 1, 4)], expected_aesthetic, rtol=1e-5, atol=1e-5)
    assert out.schema.field("clip_score").type == pa.float32()
    vectors = out.column("image_embedding").to_pylist()
    assert [v is None for v in vectors] == [False, False, True, True, False, True]
    np.testing.assert_allclose([vectors[i] for i in (0, 1, 4)], embeds.numpy(), atol=2e-3)  # stored as float16


def test_clip_scorer_without_aesthetic_head_gives_null_aesthetic(tiny_clip):
    config = ClipScoringConfig(clip=tiny_clip).model_dump(mode="json")
    batch = _batch([encode_image(_images(1)[0])], ["a red circle"], [False]).drop_columns(["reject_stage"])
    out = ClipScorer(config)(ClipPreprocess(config)(batch))
    assert out.column("aesthetic_score").null_count == 1 and out.column("clip_score").null_count == 0


def test_stage_resources_validate_and_build_map_batches_kwargs(tiny_clip):
    kwargs = ClipScorer.map_batches_kwargs(
        ClipScoringConfig(clip=tiny_clip, scorer={"num_gpus": 0.5, "concurrency": (1, 3), "batch_size": 32})
    )
    assert kwargs["num_gpus"] == 0.5 and kwargs["batch_size"] == 32 and kwargs["batch_format"] == "pyarrow"
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (1, 3)
    assert ClipScoringConfig.model_validate(kwargs["fn_constructor_kwargs"]["config"]).clip == tiny_clip
    with pytest.raises(ValueError, match="num_gpus"):
        StageResources(device="cpu", num_gpus=1)
    with pytest.raises(ValueError, match="num_gpus > 0"):
        StageResources(device="cuda")
    with pytest.raises(ValueError, match="concurrency"):
        StageResources(concurrency=(3, 1))


# ---- CLAP ------------------------------------------------------------------------------------


def _tone(seconds: float, hz: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_clap_similarity_is_the_cosine_of_transformers_embeddings(clap_dir):
    clap = load_clap({"path": str(clap_dir)})
    clips = [(_tone(0.5), 16000), encode_audio(_tone(3.0, 660), 16000)]  # the second is 3x the longest clip
    texts = ["a tone", "a high tone"]
    audio, text = clap.embed_audio(clips), clap.embed_texts(texts)
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(clap.embed_audio(clips), audio)  # long clips are cut, not randomly cropped
    tokens = clap.tokenizer(texts, padding=True, return_tensors="pt")
    raw_text = clap.model.text_projection(clap.model.text_model(**tokens).pooler_output)
    expected = torch.nn.functional.cosine_similarity(audio, raw_text)
    torch.testing.assert_close(clap.similarity(audio, text), expected)
    with pytest.raises(FileNotFoundError, match="no-clap-here"):
        load_clap({"path": str(clap_dir / "no-clap-here")})


def test_clap_stages_score_rows_with_audio_and_caption(clap_dir):
    config = ClapScoringConfig(clap={"path": str(clap_dir)}).model_dump(mode="json")
    audio = [encode_audio(_tone(0.7, hz), 16000) for hz in (300, 500, 700)]
    batch = pa.table({
        "key": list("abcde"),
        "caption": pa.array(["a low tone", "a tone", None, "noise", "a high tone"]),
        "audio": pa.array([audio[0], audio[1], audio[2], b"RIFF garbage", None], pa.binary()),
        "reject_reason": pa.nulls(5, pa.string()),
    })
    features = ClapPreprocess(config)(batch)
    assert features.column(CLAP_FEATURES).type.shape == [1, 51, 64]
    out = ClapScorer(config)(features)
    assert out.column("reject_stage").to_pylist() == [None, None, None, "score", None]
    scores = out.column("clap_score").to_pylist()
    assert [s is None for s in scores] == [False, False, True, True, True]
    clap = load_clap({"path": str(clap_dir)})
    expected = clap.similarity(clap.embed_audio(audio[:2]), clap.embed_texts(["a low tone", "a tone"]))
    np.testing.assert_allclose(scores[:2], expected, rtol=1e-5, atol=1e-6)


def test_clip_stages_pass_empty_and_imageless_batches(tiny_clip):
    config = ClipScoringConfig(clip=tiny_clip).model_dump(mode="json")
    preprocess, scorer = ClipPreprocess(config), ClipScorer(config)
    empty = scorer(preprocess(_batch([], [], [])))
    assert empty.num_rows == 0 and {"clip_score", "aesthetic_score"} <= set(empty.column_names)
    imageless = scorer(preprocess(_batch([None, None], ["a caption", None], [False, False])))
    assert imageless.column("clip_score").null_count == 2
