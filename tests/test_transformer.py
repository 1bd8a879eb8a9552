"""The three-stream transformer: presets, stream skipping, conditioning modes, save/load, FLOPs."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omniflow.modality import Modality
from omniflow.presets import PRESETS, build_transformer, count_parameters, get_preset, model_cost
from omniflow.transformer import OmniFlowTransformer

I, T, A = Modality.IMAGE, Modality.TEXT, Modality.AUDIO


def _inputs(preset="tiny", batch=2, seed=0, modalities=(I, T, A)):
    g = torch.Generator().manual_seed(seed)
    shapes = PRESETS[preset].latent_shapes()
    latents = {m: torch.randn(batch, *shapes[m], generator=g) for m in modalities}
    times = {m: torch.rand(batch, generator=g) for m in modalities}
    pooled = torch.randn(batch, PRESETS[preset].config["pooled_projection_dim"], generator=g)
    return latents, times, pooled


def _randomize(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_presets_build_and_run(name):
    model = build_transformer(name).eval()
    latents, times, pooled = _inputs(name)
    with torch.no_grad():
        out = model(latents, times, pooled)
    assert out[I].shape == latents[I].shape and out[A].shape == latents[A].shape
    assert out[T].shape == (2, PRESETS[name].text_tokens, PRESETS[name].config["text_out_dim"])


def test_a_stream_starts_the_same_whatever_the_other_streams():
    """The staged recipe's stage-1 (image, text) and stage-2 (text, audio) models start from one text
    stream, so the merge averages text weights that began together; the seed alone decides them."""
    torch.manual_seed(123)  # the global RNG plays no part
    image_text = build_transformer("tiny", streams=("image", "text")).state_dict()
    torch.manual_seed(456)
    text_audio = build_transformer("tiny", streams=("text", "audio")).state_dict()
    common = set(image_text) & set(text_audio)
    assert common and all(name.startswith(("blocks.", "text_", "time_embed.text.")) for name in common)
    for name in common:
        assert torch.equal(image_text[name], text_audio[name]), name
    reseeded = build_transformer("tiny", seed=1, streams=("image", "text")).state_dict()
    parameters = {n for n, _ in build_transformer("tiny", streams=("image", "text")).named_parameters()}
    random_layers = [n for n, v in image_text.items() if n in parameters and v.ndim > 1 and v.abs().sum() > 0]
    assert random_layers and all(not torch.equal(image_text[n], reseeded[n]) for n in random_layers)
    # Xavier-uniform bounds hold for every linear and patch-embedding layer
    for name in random_layers:
        if name.endswith(".weight") and "timestep_embedder" not in name:
            w = image_text[name].flatten(1)
            assert w.abs().max() <= (6 / (w.shape[0] + w.shape[1])) ** 0.5 + 1e-6, name


def test_sd3_medium_preset_matches_the_paper_size():
    cfg = get_preset("sd3-medium").config
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (24, 24, 64)
    assert cfg["joint_attention_dim"] == 4096 and cfg["pooled_projection_dim"] == 2048
    assert (cfg["audio_in_channels"], *cfg["audio_sample_size"]) == (8, 256, 16)
    # Without audio, our parameters are SD3 medium's, less the last block's unused text query,
    # plus the text timestep embedder and the text head.
    ours, _ = count_parameters({**cfg, "streams": ("image", "text")})
    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(
            num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
            joint_attention_dim=4096, pooled_projection_dim=2048, in_channels=16, pos_embed_max_size=192,
        )
    dim, j = 1536, 4096
    unused_query = dim * dim + dim
    text_time_embed = sum(p.numel() for p in sd3.time_text_embed.parameters())
    text_head = (dim * j + j) + (dim * 2 * j + 2 * j) + (j * 1536 + 1536)
    assert ours == sum(p.numel() for p in sd3.parameters()) - unused_query + text_time_embed + text_head


def test_absent_stream_is_skipped_not_zero_filled(tiny_model):
    """A call without audio equals a model that has no audio stream at all."""
    _randomize(tiny_model)
    image_text = OmniFlowTransformer(**{**PRESETS["tiny"].config, "streams": ("image", "text")}).eval()
    own = image_text.state_dict()
    image_text.load_state_dict({k: v for k, v in tiny_model.state_dict().items() if k in own}, strict=True)
    latents, times, pooled = _inputs(modalities=(I, T))
    with torch.no_grad():
        skipped = tiny_model(latents, times, pooled)
        reference = image_text(latents, times, pooled)
        zeros = tiny_model({**latents, A: torch.zeros(2, *PRESETS["tiny"].latent_shapes()[A])},
                           {**times, A: torch.zeros(2)}, pooled)
    assert set(skipped) == {I, T}
    torch.testing.assert_close(skipped[I], reference[I], atol=1e-6, rtol=0)
    torch.testing.assert_close(skipped[T], reference[T], atol=1e-6, rtol=0)
    assert not torch.allclose(skipped[I], zeros[I], atol=1e-4)


@pytest.mark.parametrize("subset", [(I,), (T,), (A,), (I, A), (T, A)])
def test_any_subset_runs(tiny_model, subset):
    latents, times, pooled = _inputs(modalities=subset)
    with torch.no_grad():
        out = tiny_model(latents, times, pooled)
    assert set(out) == set(subset)


def test_conditioning_modes_differ_and_split_isolates_timesteps():
    joint = _randomize(build_transformer("tiny")).eval()
    split = OmniFlowTransformer(**{**PRESETS["tiny"].config, "split_timestep_conditioning": True}).eval()
    split.load_state_dict(joint.state_dict())
    latents, times, pooled = _inputs()
    with torch.no_grad():
        assert not torch.allclose(joint(latents, times, pooled)[I], split(latents, times, pooled)[I])
        # Changing the audio time changes every stream's modulation in joint mode; in split mode
        # it reaches the image only through attention, so the image head's own AdaLN input is
        # unchanged: check at the conditioning vectors.
        other = {**times, A: 1 - times[A]}
        for model, same in ((joint, False), (split, True)):
            seen = []
            h = model.image_norm_out.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[1]))
            model(latents, times, pooled)
            model(latents, other, pooled)
            h.remove()
            assert torch.equal(seen[0], seen[1]) is same


def test_save_and_load_round_trip(tmp_path, tiny_model):
    _randomize(tiny_model)
    tiny_model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").exists()
    loaded = OmniFlowTransformer.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.qk_norm == "layer_norm" and tuple(loaded.config.streams) == ("image", "text", "audio")
    latents, times, pooled = _inputs()
    with torch.no_grad():
        a, b = tiny_model(latents, times, pooled), loaded(latents, times, pooled)
    for m in a:
        assert torch.equal(a[m], b[m])


def test_input_errors(tiny_model):
    latents, times, pooled = _inputs()
    with pytest.raises(ValueError, match="timesteps missing"):
        tiny_model(latents, {I: times[I]}, pooled)
    with pytest.raises(ValueError, match="at most 16"):
        tiny_model({T: torch.randn(2, 4, 17)}, {T: times[T]}, pooled)
    image_only = OmniFlowTransformer(**{**PRESETS["tiny"].config, "streams": ("image",)})
    with pytest.raises(ValueError, match="got latents for"):
        image_only(latents, times, pooled)
    with pytest.raises(ValueError, match="streams must be"):
        OmniFlowTransformer(**{**PRESETS["tiny"].config, "streams": ("video",)})
    with pytest.raises(ValueError, match="qk_norm"):
        OmniFlowTransformer(**{**PRESETS["tiny"].config, "qk_norm": "group_norm"})


def test_narrow_text_latents_are_zero_padded(tiny_model):
    _randomize(tiny_model)
    latents, times, pooled = _inputs()
    narrow = latents[T][..., :10]
    padded = torch.nn.functional.pad(narrow, (0, 6))
    with torch.no_grad():
        a = tiny_model({**latents, T: narrow}, times, pooled)
        b = tiny_model({**latents, T: padded}, times, pooled)
    torch.testing.assert_close(a[I], b[I])


@pytest.mark.parametrize("preset,modalities", [("tiny", (I, T, A)), ("tiny", (I, T)), ("toy", (T, A))])
def test_flops_counter_matches_torch(preset, modalities):
    model = build_transformer(preset).eval()
    latents, times, pooled = _inputs(preset, batch=1, modalities=modalities)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(latents, times, pooled)
    shapes = {m: PRESETS[preset].latent_shapes()[m] for m in modalities}
    cost = model_cost(PRESETS[preset].config, shapes)
    assert cost.forward_flops == counter.get_total_flops()
    assert cost.train_flops == 3 * cost.forward_flops
    assert cost.parameters == sum(p.numel() for p in model.parameters())


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
