"""Multi-modal guidance (OmniFlow, arXiv 2412.01169, Sec. 3.2) against closed forms:
v = v(all) + sum_j (alpha_j - 1) (v(j only) - v(none)), by hand and through one guided Euler step."""

import pytest
import torch

from omniflow.flow import sigma_schedule
from omniflow.guidance import classifier_free_guidance, multimodal_guidance
from omniflow.modality import Modality
from omniflow.presets import PRESETS
from omniflow.sampling import combine_branches, generate

I, T, A = Modality.IMAGE, Modality.TEXT, Modality.AUDIO
SHAPES = PRESETS["tiny"].latent_shapes()
V_ALL, V_NONE = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5])
V_AUDIO, V_TEXT = torch.tensor([3.0, -1.0]), torch.tensor([-2.0, 4.0])


def _rule(alpha_audio, alpha_text, *, v_all=V_ALL, v_text=V_TEXT):
    v_only = {"audio": V_AUDIO, "text": v_text}
    return multimodal_guidance(v_all, V_NONE, v_only, {"audio": alpha_audio, "text": alpha_text})


def test_two_conditions_equal_the_hand_expanded_rule():
    # (1, 2) + (3 - 1) (3, -1.5) + (0.5 - 1) (-2, 3.5)
    torch.testing.assert_close(_rule(3.0, 0.5), torch.tensor([8.0, -2.75]))
    torch.testing.assert_close(_rule(0.5, 3.0), torch.tensor([-4.5, 9.75]))  # the weights swapped
    branches = {"all": V_ALL, "none": V_NONE, "only_audio": V_AUDIO, "only_text": V_TEXT}
    combined = combine_branches(branches, [T, A], {"audio": 3.0, "text": 0.5})
    torch.testing.assert_close(combined, torch.tensor([8.0, -2.75]))


def test_two_condition_rule_reduces_to_its_special_cases():
    # alpha = 1 drops a condition's term, whatever its branch holds
    torch.testing.assert_close(_rule(3.0, 1.0), torch.tensor([7.0, -1.0]))
    torch.testing.assert_close(_rule(3.0, 1.0, v_text=torch.tensor([100.0, -100.0])), torch.tensor([7.0, -1.0]))
    torch.testing.assert_close(_rule(1.0, 1.0), V_ALL)
    # conditions whose effects add (v_all - v_none = sum of each one's effect) under one weight:
    # classifier-free guidance on the pair
    additive = V_AUDIO + V_TEXT - V_NONE
    torch.testing.assert_close(_rule(4.0, 4.0, v_all=additive), classifier_free_guidance(V_NONE, additive, 4.0))


def test_one_condition_is_classifier_free_guidance():
    v = {"all": V_ALL, "none": V_NONE}
    expected = torch.tensor([4.0, 6.5])  # (0, 0.5) + 4 (1, 1.5)
    torch.testing.assert_close(combine_branches(v, [T], {"text": 4.0}), expected)
    torch.testing.assert_close(combine_branches(v, [T], 4.0), expected)
    torch.testing.assert_close(classifier_free_guidance(V_NONE, V_ALL, 4.0), expected)


@pytest.fixture
def random_tiny(tiny_model):
    """The tiny transformer with every parameter drawn from N(0, 0.2): its zero-initialised output
    layers would make every branch's velocity zero and the check below empty."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return tiny_model


def test_at2i_guided_euler_step_equals_the_rule_on_separate_forwards(random_tiny, one_thread):
    g = torch.Generator().manual_seed(0)
    clean = {A: torch.randn(2, *SHAPES[A], generator=g), T: torch.randn(2, *SHAPES[T], generator=g)}
    pooled = {T: torch.randn(2, 16, generator=g), A: torch.randn(2, 8, generator=g)}
    out = generate(random_tiny, "at2i", conditions=clean, pooled=pooled, target_shapes={"image": SHAPES[I]},
                   steps=1, guidance={"audio": 2.5, "text": 4.0}, generator=torch.Generator().manual_seed(1))

    # generate's draws in its order: the target's noise, then a null per condition (text, audio)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, *SHAPES[I], generator=g)
    null = {T: torch.randn(2, *SHAPES[T], generator=g), A: torch.randn(2, *SHAPES[A], generator=g)}
    sigma = sigma_schedule(1, shift=3.0)

    def v(*kept):
        latents = {I: x1, **{m: clean[m] if m in kept else null[m] for m in (T, A)}}
        times = {I: sigma[0].expand(2), **{m: torch.full((2,), 0.0 if m in kept else 1.0) for m in (T, A)}}
        vec = torch.zeros(2, 16)
        source = next((m for m in (T, A) if m in kept), None)  # text's pooled vector before audio's
        if source is not None:
            vec[:, : pooled[source].shape[-1]] = pooled[source]
        return random_tiny(latents, times, vec)[I]

    v_all, v_none, v_audio, v_text = v(T, A), v(), v(A), v(T)
    expected = v_all + 1.5 * (v_audio - v_none) + 3.0 * (v_text - v_none)
    torch.testing.assert_close(out[I], x1 + (sigma[1] - sigma[0]) * expected, atol=1e-5, rtol=0)
    swapped = v_all + 1.5 * (v_text - v_none) + 3.0 * (v_audio - v_none)
    assert not torch.allclose(out[I], x1 + (sigma[1] - sigma[0]) * swapped, atol=1e-3)
