"""ShapesWorld: determinism, nuisance, exact checkers (clean and after lossy trips), defects."""

import io

import numpy as np
import pytest
from PIL import Image

from omniflow.codecs.media import MediaError, decode_audio, decode_image, encode_audio
from shapesworld import (
    COLOURS,
    DEFECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    Concept,
    Reading,
    all_concepts,
    concept_accuracy,
    detect_defect,
    is_clipped,
    make_records,
    parse_caption,
    read_audio,
    read_caption,
    read_image,
    read_layout,
    render_audio,
    render_backgrounds,
    render_captions,
    render_images,
    sample_concepts,
    sample_scenes,
    split_concepts,
)

N_CLEAN = 1200  # per modality, for the >= 99% claims


@pytest.fixture(scope="module")
def batch():
    concepts = sample_concepts(N_CLEAN, seed=11)
    scenes = sample_scenes(concepts, seed=11)
    return {
        "concepts": concepts,
        "scenes": scenes,
        "images": render_images(scenes),
        "captions": render_captions(scenes),
        "waves": render_audio(scenes),
    }


def _stratified(n_per_concept: int) -> list[Concept]:
    return [c for c in all_concepts() for _ in range(n_per_concept)]


# ---------------------------------------------------------------- concepts, determinism


def test_concepts_grid_and_sampling():
    assert len(set(all_concepts())) == len(COLOURS) * len(SHAPES) >= 18
    a, b = sample_concepts(50, seed=3), sample_concepts(50, seed=3)
    assert a == b and a != sample_concepts(50, seed=4)
    two_colours = sample_concepts(100, seed=0, colours=["red", "blue"])
    assert {c.colour for c in two_colours} == {"red", "blue"}
    assert {c.shape for c in sample_concepts(100, seed=0, shapes=["square"])} == {"square"}
    held = split_concepts(seed=0).held_out
    assert set(sample_concepts(100, seed=0, pairs=held)) == set(held)


def test_user_errors_are_value_errors():
    with pytest.raises(ValueError, match="colour"):
        Concept("purple", "circle")
    with pytest.raises(ValueError, match="n must"):
        sample_concepts(-1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        sample_concepts(1, seed=-1)
    with pytest.raises(ValueError, match="not both"):
        sample_concepts(1, seed=0, colours=["red"], pairs=all_concepts())
    with pytest.raises(ValueError, match="n_held_out"):
        split_concepts(n_held_out=0)
    scenes = sample_scenes(sample_concepts(2, seed=0), seed=0)
    with pytest.raises(ValueError, match="size"):
        render_images(scenes, size=8)
    with pytest.raises(ValueError, match="duration_s"):
        render_audio(scenes, duration_s=0.5)
    with pytest.raises(ValueError, match="defect_rate"):
        make_records(2, seed=0, defect_rate=1.5)
    with pytest.raises(ValueError, match="defects"):
        make_records(2, seed=0, defect_rate=0.5, defects=["smudged"])
    with pytest.raises(ValueError, match="images must be"):
        read_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="samples"):
        concept_accuracy(Reading(["red"], ["circle"]), [])


def test_held_out_split_is_disjoint_deterministic_and_compositional():
    split = split_concepts(n_held_out=3, seed=0)
    assert split == split_concepts(n_held_out=3, seed=0)
    assert not set(split.train) & set(split.held_out)
    assert set(split.train) | set(split.held_out) == set(all_concepts())
    assert len(split.held_out) == 3 and len({c.colour for c in split.held_out}) == 3
    for n_held_out in range(1, len(COLOURS) + 1):
        train = split_concepts(n_held_out=n_held_out, seed=1).train
        assert {c.colour for c in train} == set(COLOURS)  # only combinations are new
        assert {c.shape for c in train} == set(SHAPES)
    assert len({split_concepts(seed=s).held_out for s in range(10)}) > 1


def test_rendering_is_deterministic_per_seed(batch):
    scenes = sample_scenes(batch["concepts"][:20], seed=11)
    assert scenes == batch["scenes"][:20]
    np.testing.assert_array_equal(render_images(scenes), batch["images"][:20])
    np.testing.assert_array_equal(render_audio(scenes), batch["waves"][:20])
    assert render_captions(scenes) == batch["captions"][:20]
    other = sample_scenes(batch["concepts"][:20], seed=12)
    assert not np.array_equal(render_images(other), batch["images"][:20])
    assert not np.array_equal(render_audio(other), batch["waves"][:20])


def test_outputs_have_the_documented_types(batch):
    images, waves = batch["images"], batch["waves"]
    assert images.shape == (N_CLEAN, 32, 32, 3) and images.dtype == np.uint8
    assert waves.shape == (N_CLEAN, 16000) and waves.dtype == np.float32
    assert np.abs(waves).max() <= 1.0
    assert all(isinstance(c, str) and c for c in batch["captions"])
    assert render_images(batch["scenes"][:2], size=64).shape == (2, 64, 64, 3)


def test_nuisance_really_varies(batch):
    scenes, images, waves = batch["scenes"], batch["images"], batch["waves"]
    assert {s.position for s in scenes} == set(POSITIONS)
    assert {s.size for s in scenes} == set(SIZES)
    radii = np.array([s.radius for s in scenes]) * 32
    assert radii.min() >= 5.5 and radii.max() <= 11 and radii.std() > 1.5
    # Shapes stay inside the canvas with a margin: the border ring is background.
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    assert (border.max(-1).astype(int) - border.min(-1)).max() < 100
    backgrounds = render_backgrounds(scenes).reshape(N_CLEAN, -1, 3)
    assert np.ptp(backgrounds.mean(1)) > 30 and np.ptp(backgrounds.std(1).mean(1)) > 4
    red_circle = Concept("red", "circle")
    red_circles = [c for c, s in zip(batch["captions"], scenes) if s.concept == red_circle]
    assert len(set(red_circles)) >= 8
    # Audio: onset, loudness and pitch (detune) all move from clip to clip.
    onsets = (np.abs(waves) > 0.05).argmax(1) / 16000
    assert onsets.min() < 0.05 and onsets.max() > 0.15
    assert np.ptp(np.abs(waves).max(1)) > 0.3
    detune = np.array([s.detune_cents for s in scenes])
    assert np.ptp(detune) > 40 and np.abs(detune).max() <= 30


# ---------------------------------------------------------------- checkers on clean data


def test_image_checker_is_exact_on_clean_images(batch):
    accuracy = concept_accuracy(read_image(batch["images"]), batch["concepts"])
    assert accuracy["both"] >= 0.99, accuracy
    # PIL images and float arrays are read the same.
    pil = [Image.fromarray(im) for im in batch["images"][:50]]
    assert read_image(pil) == read_image(batch["images"][:50].astype(np.float32) / 255)


def test_caption_checker_is_exact_on_clean_captions(batch):
    accuracy = concept_accuracy(read_caption(batch["captions"]), batch["concepts"])
    assert accuracy["both"] >= 0.99, accuracy


def test_audio_checker_is_exact_on_clean_audio(batch):
    accuracy = concept_accuracy(read_audio(batch["waves"]), batch["concepts"])
    assert accuracy["both"] >= 0.99, accuracy


def test_audio_checker_reads_22khz(batch):
    concepts = batch["concepts"][:90]
    native = render_audio(batch["scenes"][:90], sample_rate=22050)
    assert concept_accuracy(read_audio(native, 22050), concepts)["both"] >= 0.99
    from scipy.signal import resample_poly

    upsampled = resample_poly(batch["waves"][:90], 441, 320, axis=1)
    assert concept_accuracy(read_audio(upsampled, sample_rate=22050), concepts)["both"] >= 0.99


def test_captions_agree_with_the_render(batch):
    scenes, layout = batch["scenes"], read_layout(batch["images"])
    assert layout.sizes == [s.size for s in scenes]
    assert layout.positions == [s.position for s in scenes]
    stated = [parse_caption(c) for c in batch["captions"]]
    assert all(p.size in (None, s.size) for p, s in zip(stated, scenes))
    assert all(p.position in (None, s.position) for p, s in zip(stated, scenes))
    assert sum(p.size is not None for p in stated) > N_CLEAN / 5
    assert sum(p.position is not None for p in stated) > N_CLEAN / 5


def test_caption_parsing_is_tolerant_and_says_unknown():
    assert parse_caption("THERE IS A LARGE Blue Square, at the bottom-right!!") == parse_caption(
        "there is a big blue square in the bottom right"
    )
    assert parse_caption("two red circles").shape == "circle"
    assert parse_caption("in the upper left").position == "top left"
    reading = read_caption(["the square is blue", "hello world", "a red or blue circle", None, 3])
    assert reading.colours == ["blue", None, None, None, None]
    assert reading.shapes == ["square", None, "circle", None, None]


def test_concept_accuracy_counts_unknowns_as_wrong():
    truth = [Concept("red", "circle"), Concept("blue", "square")]
    assert concept_accuracy(Reading(["red", None], ["circle", "square"]), truth) == {
        "colour": 0.5, "shape": 1.0, "both": 0.5, "unknown": 0.5,
    }
    assert concept_accuracy(truth, truth)["both"] == 1.0


# ---------------------------------------------------------------- robustness (how it is used)


def test_image_checker_survives_noise_and_resize(batch):
    rng = np.random.default_rng(0)
    noisy = np.clip(batch["images"] / 255 + rng.normal(0, 0.05, batch["images"].shape), 0, 1)
    degraded = np.stack([
        np.asarray(Image.fromarray(np.round(im * 255).astype(np.uint8))
                   .resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR))
        for im in noisy
    ])
    accuracy = concept_accuracy(read_image(degraded), batch["concepts"])
    assert accuracy["both"] >= 0.99, accuracy


MEL = {"sr": 16000, "n_fft": 1024, "fmin": 0, "fmax": 8000}  # AudioLDM2's front end, with 64 mel bins


def test_audio_checker_survives_a_mel_griffin_lim_round_trip():
    librosa = pytest.importorskip("librosa")
    concepts = _stratified(2)
    waves = render_audio(sample_scenes(concepts, seed=21))
    mel = librosa.feature.melspectrogram(y=waves, hop_length=160, n_mels=64, **MEL)
    # Pseudo-inverse of the filterbank instead of librosa's NNLS (same result here, 10x faster).
    inverse = np.linalg.pinv(librosa.filters.mel(n_mels=64, **MEL))
    magnitude = np.sqrt(np.maximum(inverse @ mel, 0))
    rebuilt = librosa.griffinlim(magnitude, n_iter=32, hop_length=160, n_fft=1024)
    accuracy = concept_accuracy(read_audio(rebuilt), concepts)
    assert accuracy["both"] >= 0.99, accuracy


@pytest.mark.slow
def test_audio_checker_survives_librosa_mel_to_audio():
    librosa = pytest.importorskip("librosa")
    concepts = _stratified(1)
    waves = render_audio(sample_scenes(concepts, seed=22))
    mel = librosa.feature.melspectrogram(y=waves, hop_length=160, n_mels=64, **MEL)
    rebuilt = librosa.feature.inverse.mel_to_audio(mel, hop_length=160, n_iter=32, **MEL)
    accuracy = concept_accuracy(read_audio(rebuilt), concepts)
    assert accuracy["both"] >= 0.99, accuracy


# ---------------------------------------------------------------- defects


def test_checkers_reject_blank_noise_and_silence(batch):
    rng = np.random.default_rng(0)
    blank = render_backgrounds(batch["scenes"][:100])
    noise = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    for images in (blank, noise):
        assert read_image(images).concepts() == [None] * 100
    hiss = rng.normal(0, 0.1, (50, 16000)).astype(np.float32)
    assert read_audio(np.concatenate([hiss, np.zeros((1, 16000), np.float32)])).concepts() == (
        [None] * 51
    )


def test_is_clipped_flags_overdriven_audio_only(batch):
    waves = batch["waves"][:300]
    assert not is_clipped(waves).any()
    assert not is_clipped([decode_audio(encode_audio(w, 16000))[0] for w in waves[:100]]).any()
    assert is_clipped(np.clip(waves * 10, -1, 1)).all()
    assert is_clipped(0.5 * np.clip(waves * 10, -1, 1)).all()  # clipped, then turned down


def test_records_are_deterministic_and_plant_every_defect():
    rows = make_records(64, seed=5, defect_rate=0.5)
    assert rows == make_records(64, seed=5, defect_rate=0.5)
    assert rows != make_records(64, seed=6, defect_rate=0.5)
    defects = [r["defect"] for r in rows]
    assert sum(d is not None for d in defects) == 32
    assert set(defects) == {None, *DEFECTS}
    assert len({r["id"] for r in rows}) == 64
    assert all(r["colour"] in COLOURS and r["shape"] in SHAPES for r in rows)


def test_planted_defects_are_detectable():
    rows = make_records(160, seed=7, defect_rate=0.5)
    for row in rows:
        defect = row["defect"]
        if defect in ("truncated_image", "garbage_image"):
            with pytest.raises(MediaError):
                decode_image(row["image"])
        elif defect in ("silent_audio", "garbage_audio"):
            with pytest.raises(MediaError):
                decode_audio(row["audio"])
        elif defect == "clipped_audio":
            assert is_clipped([decode_audio(row["audio"])[0]])[0]
        elif defect in ("blank_image", "noise_image"):
            image = np.asarray(decode_image(row["image"]))
            assert read_image(image[None]).concepts() == [None]
        elif defect == "mismatched_caption":
            said = read_caption([row["caption"]]).concepts()[0]
            assert said is not None and said != Concept(row["colour"], row["shape"])
        assert detect_defect(row) == defect, row["id"]


def test_clean_records_read_back_in_every_modality():
    for image_format in ("PNG", "JPEG"):
        rows = make_records(90, seed=8, image_format=image_format)
        truth = [Concept(r["colour"], r["shape"]) for r in rows]
        images = np.stack([np.asarray(decode_image(r["image"])) for r in rows])
        decoded = [decode_audio(r["audio"]) for r in rows]
        assert decoded[0][1] == 16000
        assert concept_accuracy(read_image(images), truth)["both"] >= 0.99
        assert concept_accuracy(read_audio([w for w, _ in decoded]), truth)["both"] >= 0.99
        assert concept_accuracy(read_caption([r["caption"] for r in rows]), truth)["both"] == 1.0
        assert Image.open(io.BytesIO(rows[0]["image"])).format == image_format
