"""The evaluation metrics against closed forms and hand-computed values: the Fréchet distance
against its formula on the sample moments, the CLIP score on hand vectors, CIDEr-D, BLEU and
ROUGE-L on captions small enough to score by hand."""

import doctest

import numpy as np
import pytest
import torch
import torchvision

import omniflow.metrics
from omniflow.metrics import (
    FrechetDistance,
    caption_metrics,
    captions,
    clip_score,
    frechet,
    inception_features,
    load_statistics,
    save_statistics,
    similarity,
    tokenize_caption,
)


@pytest.mark.parametrize("module", [omniflow.metrics, captions, frechet, similarity])
def test_docstring_examples_hold(module):
    assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------- Fréchet distance


def gaussian_sets(rng: np.random.Generator, *, n: int = 3000, d: int = 12):
    """Two Gaussian samples with different means and random full covariances."""
    a_DD, b_DD = rng.normal(size=(d, d)), rng.normal(size=(d, d)) / 2 + np.eye(d)
    real_ND = rng.normal(size=(n, d)) @ a_DD.T + rng.normal(size=d)
    fake_ND = rng.normal(size=(n, d)) @ b_DD.T + rng.normal(size=d)
    return real_ND, fake_ND


def closed_form(x_ND: np.ndarray, y_ND: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)) from the sample moments.

    tr((S_x S_y)^(1/2)) is computed as tr((S_x^(1/2) S_y S_x^(1/2))^(1/2)): the two matrices are
    similar, and the second is symmetric, so symmetric eigensolvers give it exactly.
    """
    s_x, s_y = np.cov(x_ND, rowvar=False), np.cov(y_ND, rowvar=False)
    w, v = np.linalg.eigh(s_x)
    s_x_half = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(s_x_half @ s_y @ s_x_half).clip(min=0)).sum()
    mean_term = np.sum((x_ND.mean(0) - y_ND.mean(0)) ** 2)
    return float(mean_term + np.trace(s_x) + np.trace(s_y) - 2 * cross)


def filled(real_ND: np.ndarray, fake_ND: np.ndarray, *, batch: int = 500) -> FrechetDistance:
    """A FrechetDistance fed in batches, as the evaluation job streams features."""
    fd = FrechetDistance(num_features=real_ND.shape[1])
    for start in range(0, len(real_ND), batch):
        fd.add(real_ND[start : start + batch], real=True)
    for start in range(0, len(fake_ND), batch):
        fd.add(torch.from_numpy(fake_ND[start : start + batch]).float(), real=False)
    return fd


def test_frechet_distance_of_a_set_to_itself_is_zero():
    real_ND, _ = gaussian_sets(np.random.default_rng(0))
    fd = filled(real_ND, real_ND)
    scale = np.trace(np.cov(real_ND, rowvar=False))
    assert abs(fd.compute()) < 1e-9 * scale


def test_frechet_distance_matches_the_closed_form_on_gaussians():
    real_ND, fake_ND = gaussian_sets(np.random.default_rng(1))
    # fake batches go in as float32, as extractors return them
    fake_ND = fake_ND.astype(np.float32).astype(np.float64)
    expected = closed_form(real_ND, fake_ND)
    assert expected > 1.0  # the two sets really differ
    fd = filled(real_ND, fake_ND)
    assert fd.num_samples(real=True) == fd.num_samples(real=False) == 3000
    assert fd.compute() == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_on_diagonal_covariances():
    # Diagonal covariances make the formula a sum over axes: (m1 - m2)^2 + (s1 - s2)^2 per axis.
    rng = np.random.default_rng(2)
    scales_D, shifts_D = np.array([0.5, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, -1.0, 2.0])
    real_ND = rng.normal(size=(4000, 4))
    fake_ND = rng.normal(size=(4000, 4)) * scales_D + shifts_D
    fd = filled(real_ND, fake_ND)
    assert fd.compute() == pytest.approx(closed_form(real_ND, fake_ND), rel=1e-7)
    # ... and the population value, within sampling error
    population = np.sum(shifts_D**2) + np.sum((1 - scales_D) ** 2)
    assert fd.compute() == pytest.approx(population, rel=0.05)


def test_saved_reference_statistics_give_the_same_distance(tmp_path):
    real_ND, fake_ND = gaussian_sets(np.random.default_rng(3), n=500, d=6)
    first = filled(real_ND, fake_ND)
    path = str(tmp_path / "reference.npz")
    save_statistics(path, first.real_statistics(), extractor="toy-encoder-v1")

    again = FrechetDistance(num_features=6)
    again.load_real_statistics(load_statistics(path, extractor="toy-encoder-v1"))
    again.add(fake_ND.astype(np.float32), real=False)  # as `filled` gave it
    assert again.num_samples(real=True) == 500
    assert again.compute() == pytest.approx(first.compute(), rel=1e-12)

    with pytest.raises(ValueError, match="'toy-encoder-v1' features, not 'inception"):
        load_statistics(path, extractor="inception-v3")


def test_frechet_distance_refuses_what_it_cannot_compute():
    fd = FrechetDistance(num_features=3)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\), got \(4, 2\)"):
        fd.add(np.zeros((4, 2)), real=True)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\), got \(3,\)"):
        fd.add(np.zeros(3), real=True)
    fd.add(np.zeros((1, 3)), real=True)
    fd.add(np.random.default_rng(0).normal(size=(5, 3)), real=False)
    with pytest.raises(ValueError, match="at least 2 real samples, got 1"):
        fd.compute()
    fd = FrechetDistance(num_features=3)
    fd.add(np.zeros((2, 3)), real=True)
    with pytest.raises(ValueError, match="at least 2 generated samples, got 0"):
        fd.compute()
    with pytest.raises(ValueError, match="do not fit 3 features"):
        fd.load_real_statistics(FrechetDistance(num_features=4).real_statistics())


def test_inception_features_load_a_local_weights_file(tmp_path):
    # torchvision's InceptionV3, randomly initialised, has the layer names and shapes of FID's
    # network, so its state dict stands in for the real weights file.
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    extractor = inception_features(str(path))
    images_BCHW = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        features_BD = extractor(images_BCHW)
    assert features_BD.shape == (2, 2048)
    assert torch.isfinite(features_BD).all()

    with pytest.raises(FileNotFoundError, match="no InceptionV3 weights file at"):
        inception_features(str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FID InceptionV3 state dict"):
        inception_features(str(tmp_path / "other.pth"))


# ---------------------------------------------------------------- CLIP score


def test_clip_score_closed_form_on_hand_vectors():
    a_BD = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b_BD = torch.tensor([[0.0, 2.0], [5.0, 0.0], [-1.0, 0.5], [1.0, 0.0], [3.0, 4.0]])
    # orthogonal, identical direction, negative cosine, 45 degrees, identical
    expected = torch.tensor([0.0, 100.0, 0.0, 100 / 2**0.5, 100.0])
    torch.testing.assert_close(clip_score(a_BD, b_BD), expected)


def test_clip_score_ranks_matched_pairs_above_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    texts_BD = torch.randn(32, 64, generator=g)
    images_BD = texts_BD + 0.5 * torch.randn(32, 64, generator=g)
    matched_B = clip_score(images_BD, texts_BD)
    shuffled_B = clip_score(images_BD, texts_BD.roll(1, dims=0))
    assert (matched_B > shuffled_B).all()
    assert matched_B.mean() > shuffled_B.mean() + 50


def test_clip_score_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match=r"got \(2, 4\) and \(3, 4\)"):
        clip_score(torch.ones(2, 4), torch.ones(3, 4))


# ---------------------------------------------------------------- captions


def test_tokenizer_lowercases_and_drops_punctuation_as_ptb_and_coco_do():
    assert tokenize_caption("A Dog, running!") == "a dog running"
    assert tokenize_caption("  The cat...  sits; (quietly)  ") == "the cat sits quietly"
    assert tokenize_caption('He said "hello" - twice?') == "he said hello twice"
    # clitics become tokens; numbers and hyphenated words stay whole; symbols stay as tokens
    assert tokenize_caption("The man\u2019s dog isn't here") == "the man 's dog is n't here"
    assert tokenize_caption("A 3-year-old with 1,000 toys, 2.5 m tall") == (
        "a 3-year-old with 1,000 toys 2.5 m tall"
    )
    assert tokenize_caption("50% off & more") == "50 % off & more"
    assert tokenize_caption("") == ""


def test_identical_captions_score_one_and_disjoint_ones_zero():
    caption = "A small red circle above a blue square."
    scores = caption_metrics(
        [caption, "green triangles everywhere", "the cat sat on the mat"],
        [[caption], ["a small red circle"], ["a blue square on grass", "a square"]],
    )
    assert scores.bleu_per_sample[0] == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-6)
    assert scores.rouge_l_per_sample[0] == pytest.approx(1.0)
    # the second shares no word with its reference; the third shares only "on"
    assert scores.bleu_per_sample[1] == pytest.approx([0.0] * 4, abs=1e-6)
    assert scores.rouge_l_per_sample[1] == 0.0
    assert scores.cider_per_sample[1] == 0.0
    assert scores.cider_per_sample.shape == scores.rouge_l_per_sample.shape == (3,)
    assert scores.bleu_per_sample.shape == (3, 4)


def test_cider_bleu_and_rouge_by_hand():
    scores = caption_metrics(
        ["a red circle", "a green square"],
        [["a red circle"], ["a blue square"]],
    )
    # CIDEr-D, per sample: 10 * mean over n = 1..4 of the clipped cosine between the candidate's
    # and the reference's tf-idf vectors of n-grams, times exp(-delta^2 / (2 * 6^2)) for a length
    # difference delta (0 here), averaged over references (one here).
    # IDF of an n-gram = log(N images) - log(max(1, images whose references hold it)), N = 2:
    #   "a" is in both references: weight 0; every other n-gram weighs L = log 2, including
    #   "green" and "a green", found in no reference.
    # Sample 1 (identical): n = 1..3 vectors are equal -> cosine 1; no 4-grams -> 0.
    #   CIDEr = 10 * (1 + 1 + 1 + 0) / 4 = 7.5
    # Sample 2: unigrams {a: 0, green: L, square: L} vs {a: 0, blue: L, square: L}:
    #   dot = L * L (square), norms sqrt(2) L each -> cosine 1/2; no shared 2- or 3-gram.
    #   CIDEr = 10 * (0.5 + 0 + 0 + 0) / 4 = 1.25
    assert scores.cider_per_sample == pytest.approx([7.5, 1.25])
    assert scores.cider == pytest.approx((7.5 + 1.25) / 2)
    # BLEU-1 pools clipped unigram matches over the corpus: (3 + 2) / (3 + 3); same lengths,
    # so no brevity penalty. Sample 2 alone: 2 / 3.
    assert scores.bleu[0] == pytest.approx(5 / 6)
    assert scores.bleu_per_sample[:, 0] == pytest.approx([1.0, 2 / 3])
    # ROUGE-L of sample 2: LCS "a square" = 2 words; precision = recall = 2/3, so F = 2/3.
    assert scores.rouge_l_per_sample == pytest.approx([1.0, 2 / 3])
    assert scores.summary() == {
        "CIDEr": scores.cider,
        "BLEU-1": scores.bleu[0],
        "BLEU-2": scores.bleu[1],
        "BLEU-3": scores.bleu[2],
        "BLEU-4": scores.bleu[3],
        "ROUGE-L": scores.rouge_l,
    }


def test_a_single_sample_has_zero_cider():
    # With one image every n-gram's IDF is log(1) - log(1) = 0: CIDEr needs a corpus.
    assert caption_metrics(["a red circle"], [["a red circle"]]).cider == 0.0


def test_empty_candidates_score_zero_without_crashing():
    scores = caption_metrics(["", "...", "a red circle"], [["a red circle"]] * 3)
    assert scores.cider_per_sample[:2].tolist() == [0.0, 0.0]
    assert scores.bleu_per_sample[:2] == pytest.approx(np.zeros((2, 4)), abs=1e-6)
    assert scores.rouge_l_per_sample[:2].tolist() == [0.0, 0.0]


def test_caption_metrics_refuse_malformed_input():
    with pytest.raises(ValueError, match="2 candidates and 1 reference lists"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match=r"references\[0\] is a string"):
        caption_metrics(["a cat"], ["a cat"])
    with pytest.raises(ValueError, match=r"references\[1\] holds no reference"):
        caption_metrics(["a cat", "a dog"], [["a cat"], ["", "!"]])
    with pytest.raises(ValueError, match="no captions"):
        caption_metrics([], [])
