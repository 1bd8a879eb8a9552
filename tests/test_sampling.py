"""Sampler: schedules, determinism, batched guidance branches and the guidance rules."""

import pytest
import torch

from omniflow.guidance import classifier_free_guidance, multimodal_guidance
from omniflow.modality import Modality
from omniflow.presets import PRESETS
from omniflow.sampling import generate, guidance_branches

I, T, A = Modality.IMAGE, Modality.TEXT, Modality.AUDIO
SHAPES = PRESETS["tiny"].latent_shapes()


def _cond(m, n=2, seed=0):
    return torch.randn(n, *SHAPES[m], generator=torch.Generator().manual_seed(seed))


def test_multimodal_guidance_reduces_to_cfg_with_one_condition():
    g = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    for alpha in (0.0, 1.0, 3.5):
        mm = multimodal_guidance(v_c, v_u, {"text": v_c}, {"text": alpha})
        torch.testing.assert_close(mm, v_u + alpha * (v_c - v_u))
        torch.testing.assert_close(mm, classifier_free_guidance(v_u, v_c, alpha))


def test_multimodal_guidance_formula():
    g = torch.Generator().manual_seed(0)
    v_all, v_none, v_t, v_a = (torch.randn(3, generator=g) for _ in range(4))
    out = multimodal_guidance(v_all, v_none, {"text": v_t, "audio": v_a}, {"text": 2.0, "audio": 0.5})
    torch.testing.assert_close(out, v_all + 1.0 * (v_t - v_none) - 0.5 * (v_a - v_none))


def test_guidance_branches():
    assert [b.name for b in guidance_branches([T], 1.0)] == ["all"]
    assert [b.name for b in guidance_branches([T], 4.0)] == ["all", "none"]
    assert [b.name for b in guidance_branches([T], {"text": 4.0})] == ["all", "none"]
    assert [b.name for b in guidance_branches([T, A], {"text": 4.0, "audio": 2.0})] == [
        "all", "none", "only_text", "only_audio"
    ]
    assert [b.name for b in guidance_branches([T, A], {"text": 4.0})] == ["all", "none", "only_text"]
    assert [b.name for b in guidance_branches([], 5.0)] == ["all"]
    with pytest.raises(ValueError, match="not conditions"):
        guidance_branches([T], {"image": 2.0})


def test_generate_shapes_for_every_task(tiny_model):
    for task, conds in {
        "t2i": [T], "i2t": [I], "t2a": [T], "a2t": [A], "i2a": [I], "a2i": [A],
        "at2i": [A, T], "it2a": [I, T], "ai2t": [A, I], "joint": [],
    }.items():
        from omniflow.tasks import get_task

        targets = get_task(task).targets
        out = generate(
            tiny_model, task, conditions={m: _cond(m) for m in conds},
            target_shapes={m: SHAPES[m] for m in targets}, batch_size=2, steps=3, guidance=2.0,
            generator=torch.Generator().manual_seed(0),
        )
        assert set(out) == set(targets), task
        for m in targets:
            assert out[m].shape == (2, *SHAPES[m]) and torch.isfinite(out[m]).all(), (task, m)


def test_generate_is_deterministic_under_a_generator(tiny_model):
    kwargs = {"conditions": {"text": _cond(T)}, "target_shapes": {"image": SHAPES[I]}, "steps": 4, "guidance": 3.0}
    a = generate(tiny_model, "t2i", generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(tiny_model, "t2i", generator=torch.Generator().manual_seed(7), **kwargs)
    c = generate(tiny_model, "t2i", generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a[I], b[I])
    assert not torch.allclose(a[I], c[I])


def test_each_step_is_one_batched_forward(tiny_model):
    batch_sizes = []
    handle = tiny_model.register_forward_pre_hook(lambda mod, args: batch_sizes.append(args[0]["image"].shape[0]))
    generate(
        tiny_model, "at2i", conditions={"text": _cond(T), "audio": _cond(A)},
        target_shapes={"image": SHAPES[I]}, steps=3, guidance={"text": 3.0, "audio": 2.0},
        generator=torch.Generator().manual_seed(0),
    )
    handle.remove()
    assert batch_sizes == [2 * 4] * 3  # all, none, only_text, only_audio in one call per step


def test_branches_replace_dropped_conditions_with_noise_at_t1(tiny_model):
    seen = []
    handle = tiny_model.register_forward_pre_hook(lambda mod, args: seen.append((args[0], args[1], args[2])))
    text, pooled_text = _cond(T), torch.ones(2, 16)
    generate(
        tiny_model, "t2i", conditions={"text": text}, pooled={"text": pooled_text},
        target_shapes={"image": SHAPES[I]}, steps=1, guidance=5.0, generator=torch.Generator().manual_seed(0),
    )
    handle.remove()
    latents, times, pooled = seen[0]
    assert torch.equal(latents[T][:2], text) and not torch.allclose(latents[T][2:], text)
    assert times[T].tolist() == [0, 0, 1, 1]
    assert torch.equal(pooled[:2], pooled_text) and pooled[2:].abs().sum() == 0
    assert A not in latents, "absent modalities without a shape are skipped"


def test_guidance_one_equals_unguided(tiny_model):
    kwargs = {"conditions": {"text": _cond(T)}, "target_shapes": {"image": SHAPES[I]}, "steps": 3}
    a = generate(tiny_model, "t2i", guidance=1.0, generator=torch.Generator().manual_seed(0), **kwargs)
    b = generate(tiny_model, "t2i", guidance={"text": 1.0}, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(a[I], b[I])


def test_generate_errors(tiny_model):
    with pytest.raises(ValueError, match="needs conditions"):
        generate(tiny_model, "t2i", target_shapes={"image": SHAPES[I]})
    with pytest.raises(ValueError, match="target shapes"):
        generate(tiny_model, "t2i", conditions={"text": _cond(T)}, target_shapes={})
    with pytest.raises(ValueError, match="batch_size"):
        generate(tiny_model, "joint", target_shapes={m: SHAPES[m] for m in (I, T, A)})


def test_given_unconditional_and_absent_latents(tiny_model):
    """The released pipeline's conventions as options: a dropped condition replaced by given
    latents at t = 0 (cfg_mode 'old'), an absent modality fed given latents at t = 1."""
    seen, vectors = [], []

    def record(module, args):
        seen.append(args[:2])
        vectors.append(args[2])

    handle = tiny_model.register_forward_pre_hook(record)
    text, empty = _cond(T), _cond(T, n=1, seed=1)
    width = tiny_model.config.pooled_projection_dim
    pooled, null_pooled = torch.randn(2, width - 2), torch.randn(1, width - 2)
    generate(tiny_model, "t2i", conditions={"text": text}, unconditional={"text": empty}, pooled={"text": pooled},
             null_pooled={"text": null_pooled}, target_shapes={"image": SHAPES[I]}, steps=1, guidance=5.0,
             generator=torch.Generator().manual_seed(0))
    image, prompt = _cond(I), _cond(T, n=1, seed=2)
    generate(tiny_model, "i2a", conditions={"image": image}, absent_latents={"text": prompt},
             absent_shapes={"text": SHAPES[T]}, target_shapes={"audio": SHAPES[A]}, steps=1, guidance=2.0,
             generator=torch.Generator().manual_seed(0))
    handle.remove()
    (latents, times), (i2a_latents, i2a_times) = seen
    assert torch.equal(latents[T][:2], text) and torch.equal(latents[T][2:], empty.expand(2, *SHAPES[T]))
    assert times[T].tolist() == [0, 0, 0, 0]
    assert torch.equal(vectors[0][:2, :-2], pooled) and torch.equal(vectors[0][2:, :-2], null_pooled.expand(2, -1))
    assert not vectors[0][:, -2:].any()  # zero-padded to the model's width
    assert not vectors[1][2:].any()  # no null vector given: the unconditional branch's is zero
    assert torch.equal(i2a_latents[T], prompt.expand(4, *SHAPES[T])) and i2a_times[T].tolist() == [1, 1, 1, 1]
    assert i2a_times[I].tolist() == [0, 0, 1, 1]  # the image still dropped as noise at t = 1
    with pytest.raises(ValueError, match="does not have"):
        generate(tiny_model, "t2i", conditions={"text": text}, unconditional={"image": image},
                 target_shapes={"image": SHAPES[I]}, steps=1)
    with pytest.raises(ValueError, match="give 1 or 2"):
        generate(tiny_model, "i2a", conditions={"image": image}, absent_latents={"text": _cond(T, n=3)},
                 target_shapes={"audio": SHAPES[A]}, steps=1)


def test_given_noise_replaces_every_draw(tiny_model):
    """Given noise for the target, a dropped condition's stand-in and the absent modality: the
    generator no longer matters, and the first forward sees exactly those tensors."""
    noise = {"audio": _cond(A, n=1, seed=3), "image": _cond(I, n=1, seed=4), "text": _cond(T, n=1, seed=5)}
    image = _cond(I)
    seen = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: seen.append(args[0]) and None)
    outs = [generate(tiny_model, "i2a", conditions={"image": image}, target_shapes={"audio": SHAPES[A]},
                     absent_shapes={"text": SHAPES[T]}, steps=2, guidance=3.0, noise=noise,
                     generator=torch.Generator().manual_seed(seed))[A] for seed in (0, 1)]
    handle.remove()
    assert torch.equal(outs[0], outs[1])
    first = seen[0]
    assert torch.equal(first[A], noise["audio"].expand(4, *SHAPES[A]))  # two branches of a batch of two
    assert torch.equal(first[I][2:], noise["image"].expand(2, *SHAPES[I])) and torch.equal(first[I][:2], image)
    assert torch.equal(first[T], noise["text"].expand(4, *SHAPES[T]))
    with pytest.raises(ValueError, match="give 1 or 2"):
        generate(tiny_model, "t2i", conditions={"text": _cond(T)}, target_shapes={"image": SHAPES[I]}, steps=1,
                 noise={"image": _cond(I, n=3)})
