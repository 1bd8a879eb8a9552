"""Text VAE: tiny models of the real classes, saved and loaded offline, trained from scratch."""

import itertools
import os
import random
import shutil
import time

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, LlamaConfig, LlamaForCausalLM

from omniflow.codecs.base import build_codec
from omniflow.codecs.text_vae import COMPONENTS, TextVAE, TextVAECodec
from omniflow.codecs.text_vae_reference import (
    build_reference_text_vae,
    load_reference_weights,
    map_reference_state_dict,
    to_reference_state_dict,
)
from omniflow.codecs.text_vae_train import (
    build_tiny_text_vae,
    build_word_tokenizer,
    round_trip,
    train_text_vae,
)
from omniflow.modality import Modality

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big", "")
PLACES = ("on the left", "on the right", "in the middle", "at the top", "at the bottom", "")
TEMPLATES = (
    "a {size} {colour} {shape} {place}",
    "{colour} {shape} {place}",
    "there is a {size} {colour} {shape} {place}",
    "a picture of a {size} {colour} {shape} {place}",
)
TEXTS = [
    "a small red circle on the left",
    "blue square",
    "there is a big green triangle in the middle",
]


def shapes_captions() -> list[str]:
    """Every templated caption: 6 colours x 3 shapes x sizes x places x templates (1080)."""
    captions = {
        " ".join(t.format(size=s, colour=c, shape=sh, place=p).split())
        for t, c, sh, s, p in itertools.product(TEMPLATES, COLOURS, SHAPES, SIZES, PLACES)
    }
    return sorted(captions)


@pytest.fixture(scope="module")
def split() -> tuple[list[str], list[str]]:
    captions = shapes_captions()
    random.Random(0).shuffle(captions)
    held_out = len(captions) // 5
    return captions[held_out:], captions[:held_out]


@pytest.fixture(scope="module")
def tiny_vae(split) -> TextVAE:
    return build_tiny_text_vae(split[0], seed=0)


@pytest.fixture(scope="module")
def saved_dir(tiny_vae, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text_vae") / "model"
    tiny_vae.save_pretrained(path)
    return str(path)


def test_codec_loads_offline_with_shapes_and_dtypes(saved_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    codec = build_codec({"kind": "omniflow-text-vae", "path": saved_dir})
    assert isinstance(codec, TextVAECodec) and codec.modality == Modality.TEXT
    assert codec.latent_shape == (8, 32)
    z = codec.encode(TEXTS)
    assert z.shape == (3, 8, 32) and z.dtype == torch.float32
    # LayerNorm without affine: every latent token has zero mean, unit variance over channels.
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(3, 8), atol=1e-3, rtol=0)
    captions = codec.decode(z)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)

    half = build_codec(
        {"kind": "omniflow-text-vae", "path": saved_dir, "dtype": "bfloat16", "num_beams": 2}
    )
    z16 = half.encode(TEXTS)
    assert z16.dtype == torch.bfloat16 and z16.shape == (3, 8, 32)
    assert len(half.decode(z16)) == 3


def test_save_load_round_trip_gives_identical_latents(tiny_vae, saved_dir):
    loaded = TextVAE.from_pretrained(saved_dir)
    assert loaded.config == tiny_vae.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(TEXTS), tiny_vae.encode(TEXTS), rtol=0, atol=0)
        z = tiny_vae.encode(TEXTS)
    assert loaded.decode(z, max_new_tokens=6) == tiny_vae.decode(z, max_new_tokens=6)


def test_caption_nll_is_per_caption_and_matches_the_reconstruction_loss(tiny_vae):
    """Each caption's mean next-token cross-entropy, unchanged by the batch it sits in (padding is
    not scored); over captions of one length their mean is the batch's reconstruction loss; it is
    differentiable in the latents."""
    texts = ["a small red circle on the left", "blue square", "red circle on the left"]
    with torch.no_grad():
        z = tiny_vae.encode(texts)
    z = (z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    nll = tiny_vae.caption_nll(z, texts)
    assert nll.shape == (3,) and (nll > 0).all()
    for i, text in enumerate(texts):
        torch.testing.assert_close(tiny_vae.caption_nll(z[i : i + 1], [text]), nll[i : i + 1])
    same_length = [texts[1], "red square"]
    torch.testing.assert_close(tiny_vae.caption_nll(z[:2], same_length).mean(),
                               tiny_vae.reconstruction_loss(z[:2], tiny_vae.tokenize_decoder(same_length)))
    nll.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def _manual_greedy(vae: TextVAE, z: torch.Tensor, steps: int) -> list[list[int]]:
    """Argmax decoding with a full forward per step: prefix, BOS, then the tokens so far."""
    tok = vae.tokenizer_decoder
    embed = vae.decoder.get_input_embeddings()
    ids = torch.full((z.shape[0], 1), tok.bos_token_id)
    for _ in range(steps):
        embeds = torch.cat([vae.input_proj(z), embed(ids)], dim=1)
        ids = torch.cat(
            [ids, vae.decoder(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)], dim=1
        )
    rows = []
    for row in ids[:, 1:].tolist():
        rows.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return rows


@torch.no_grad()
def test_greedy_matches_a_manual_loop_and_beam_is_deterministic(tiny_vae):
    z = (
        tiny_vae.encode(TEXTS) * 3.0
    )  # an untrained VAE: scale up so different rows decode differently
    greedy = tiny_vae.decode(z, max_new_tokens=7)
    expected = tiny_vae.tokenizer_decoder.batch_decode(
        _manual_greedy(tiny_vae, z, 7), skip_special_tokens=True
    )
    assert greedy == [e.strip() for e in expected]
    assert tiny_vae.decode(z, max_new_tokens=7) == greedy
    beam = tiny_vae.decode(z, num_beams=3, max_new_tokens=7)
    assert tiny_vae.decode(z, num_beams=3, max_new_tokens=7) == beam and len(beam) == 3


def test_user_errors(tiny_vae, saved_dir, tmp_path):
    with pytest.raises(ValueError, match="single string"):
        tiny_vae.encode("blue square")
    with pytest.raises(ValueError, match="latents must be"):
        tiny_vae.decode(torch.zeros(2, 8, 16))
    with pytest.raises(ValueError, match="num_beams"):
        tiny_vae.decode(torch.zeros(1, 8, 32), num_beams=0)
    z = tiny_vae.encode(["", "blue square"])  # an empty caption is encoded like any other
    assert z.shape == (2, 8, 32) and torch.isfinite(z).all()


@torch.no_grad()
def test_padding_length_matters_only_without_the_mask(tiny_vae):
    """With `mask_padding` the latent ignores how far a caption is padded; the release's unmasked
    encoder does not."""
    parts = {name: getattr(tiny_vae, name) for name in COMPONENTS}

    def variant(**update) -> TextVAE:
        vae = TextVAE(tiny_vae.config.model_copy(update=update), **parts)
        vae.load_glue(tiny_vae.glue_state_dict(), source="test")
        return vae

    assert tiny_vae.config.mask_padding
    torch.testing.assert_close(variant(max_length=30).encode(TEXTS), tiny_vae.encode(TEXTS))
    unmasked = variant(mask_padding=False).encode(TEXTS)
    assert not torch.allclose(variant(mask_padding=False, max_length=30).encode(TEXTS), unmasked)


def test_empty_batches():
    vae = build_tiny_text_vae(TEXTS)
    assert vae.encode([]).shape == (0, 8, 32)
    assert vae.decode(torch.zeros(0, 8, 32)) == []


def test_training_is_reproducible_from_a_seed(one_thread):
    def run() -> list[float]:
        vae = build_tiny_text_vae(TEXTS, seed=0)
        return train_text_vae(vae, TEXTS, steps=3, batch_size=4, seed=5, log_every=1).losses

    first = run()
    assert len(first) == 3 and first == run()
    with pytest.raises(ValueError, match="steps"):
        train_text_vae(build_tiny_text_vae(TEXTS), TEXTS, steps=0)


def test_missing_checkpoint_errors_name_the_path(saved_dir, tmp_path):
    missing = tmp_path / "no-such-text-vae"
    with pytest.raises(FileNotFoundError, match="no-such-text-vae"):
        build_codec({"kind": "omniflow-text-vae", "path": str(missing)})
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / "qformer")
    with pytest.raises(FileNotFoundError, match="qformer"):
        build_codec({"kind": "omniflow-text-vae", "path": str(broken)})


def _reference_style_state_dict(vae: TextVAE, *, with_encoder: bool) -> dict[str, torch.Tensor]:
    """A state dict named as the release names it: the text VAE under `text_decoder.` inside a
    transformer checkpoint, with an old rotary buffer and a transformer key beside it."""
    sd = {
        f"text_decoder.{k}": v.clone() for k, v in vae.decoder.state_dict().items()
    }  # model.*, lm_head.*
    sd |= {f"text_decoder.qformer.{k}": v.clone() for k, v in vae.qformer.state_dict().items()}
    sd["text_decoder.query"] = vae.query.detach().clone()
    for name in ("vae_proj", "input_proj"):
        sd[f"text_decoder.{name}.weight"] = getattr(vae, name).weight.detach().clone()
        sd[f"text_decoder.{name}.bias"] = getattr(vae, name).bias.detach().clone()
    if with_encoder:
        sd |= {f"text_decoder.encoder.{k}": v.clone() for k, v in vae.encoder.state_dict().items()}
    sd["text_decoder.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(4, 4)
    return sd


def test_reference_key_mapping_round_trip(tiny_vae, split):
    reference = _reference_style_state_dict(tiny_vae, with_encoder=True)
    mapped = map_reference_state_dict(reference)
    ours = tiny_vae.state_dict()
    assert set(mapped) == set(ours)
    assert all(torch.equal(mapped[k], ours[k]) for k in ours)
    back = to_reference_state_dict(mapped)
    dropped = {
        "text_decoder.model.layers.0.self_attn.rotary_emb.inv_freq",
        "transformer_blocks.0.attn.to_q.weight",
    }
    assert set(back) == set(reference) - dropped
    with pytest.raises(ValueError, match="unknown reference text-VAE keys"):
        map_reference_state_dict({**reference, "text_decoder.mystery.weight": torch.zeros(1)})

    fresh = build_tiny_text_vae(split[0], seed=1)
    assert load_reference_weights(fresh, reference) == []
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(TEXTS), tiny_vae.encode(TEXTS), rtol=0, atol=0)


def test_reference_shaped_model_loads_release_style_weights(tiny_vae):
    """The release's config (a LlamaConfig with `vae_config`) builds a model that its weights fit;
    the weights here are made the way the release's constructor shapes them, at a tiny size."""
    vae_config = {
        "prompt_size": 64,
        "vae_dim": 32,
        "vae_hidden_size": 96,
        "n_tokens": 8,
        "pre_norm": False,
        "norm_type": "rms_norm",
        "vae_scale": 1.0,
    }
    llama = LlamaConfig(**{**tiny_vae.decoder.config.to_dict(), "vae_config": vae_config})
    vae = build_reference_text_vae(
        llama,
        encoder=tiny_vae.encoder,
        tokenizer_encoder=tiny_vae.tokenizer_encoder,
        tokenizer_decoder=tiny_vae.tokenizer_decoder,
    )
    assert vae.qformer.config.num_hidden_layers == 6 and vae.config.max_length == 77
    assert vae.latent_shape == (8, 32) and not vae.config.mask_padding

    torch.manual_seed(3)
    qformer = Blip2QFormerModel(
        Blip2QFormerConfig(hidden_size=96, num_hidden_layers=6, encoder_hidden_size=64)
    )
    reference = dict(LlamaForCausalLM(llama).state_dict())
    reference |= {f"qformer.{k}": v for k, v in qformer.state_dict().items()}
    reference |= {
        "query": torch.randn(1, 8, 96),
        "vae_proj.weight": torch.randn(64, 96),
        "vae_proj.bias": torch.randn(64),
        "input_proj.weight": torch.randn(64, 32),
        "input_proj.bias": torch.randn(64),
        "q_norm.weight": torch.rand(32),
    }
    left_alone = load_reference_weights(vae, reference)
    assert left_alone and all(k.startswith("encoder.") for k in left_alone)
    assert torch.equal(vae.q_norm.weight, reference["q_norm.weight"])
    assert torch.equal(vae.decoder.lm_head.weight, reference["lm_head.weight"])
    with pytest.raises(ValueError, match="missing"):
        load_reference_weights(vae, {k: v for k, v in reference.items() if k != "query"})
    with pytest.raises(ValueError, match="shapes differ"):
        load_reference_weights(vae, reference | {"query": torch.randn(1, 4, 96)})


def test_word_tokenizer_round_trips_seen_words():
    tok = build_word_tokenizer(
        ["a red circle, on the left.", "blue square"], add_bos=True, add_eos=False
    )
    ids = tok("a blue circle, on the left.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a blue circle, on the left."
    assert tok("a pink circle")["input_ids"][2] == tok.unk_token_id


@pytest.mark.slow
def test_tiny_text_vae_trains_to_exact_round_trip(split, one_thread, tmp_path):
    train, held_out = split
    vae = build_tiny_text_vae(train, seed=0)
    start = time.perf_counter()
    history = train_text_vae(vae, train, steps=500, batch_size=64, seed=0, log_every=100)
    seconds = time.perf_counter() - start
    result = round_trip(vae, held_out)
    misses = [(d, t) for d, t in zip(result.decoded, held_out, strict=True) if d != t]
    print(
        f"\ntiny text VAE: {len(train)} training captions, {seconds:.1f} s for 500 steps, "
        f"loss {history.losses[0]:.3f} -> {history.losses[-1]:.4f}, held-out exact round trip "
        f"{result.exact_match:.4f} on {len(held_out)} captions; misses {misses[:5]}"
    )
    assert history.losses[-1] < 0.05
    assert result.exact_match >= 0.98
    beam = round_trip(vae, held_out[:64], num_beams=3)
    assert beam.exact_match >= 0.98

    vae.save_pretrained(tmp_path / "trained")
    codec = build_codec({"kind": "omniflow-text-vae", "path": str(tmp_path / "trained")})
    assert codec.decode(codec.encode(held_out[:16])) == held_out[:16]
