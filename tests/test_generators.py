"""Generators on tiny random pipelines of the real classes, saved and loaded back from disk, and the
ShapesWorld renderer: output formats, provenance, seed determinism, failures as reasons."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from omniflow.codecs.media import decode_audio, decode_image, encode_image
from pipelines.generators.base import Failure, row_seed
from pipelines.generators.config import GeneratorsConfig
from pipelines.generators.factory import build_generator
from pipelines.generators.stage import fill_batch, start_rows
from pipelines.schema import CURATED_SAMPLE, PROVENANCE, SCHEMA_VERSION
from shapesworld import make_records, read_audio, read_caption, read_image, read_layout

WORDS = ["a", "an", "the", "of", "on", "in", "picture", "photo", "small", "big", "red", "blue", "green", "yellow", "cyan", "magenta", "circle", "square", "triangle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread than on contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny checkpoints ------------------------------------------------------------------------


def _clip_tokenizer(root: Path):
    """A character-level CLIP BPE tokenizer (no merges), built offline."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (root / "clip_vocab.json").write_text(json.dumps(vocab))
    (root / "clip_merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "clip_vocab.json"), str(root / "clip_merges.txt"), model_max_length=77)


def _clip_config(tokenizer, projection_dim: int):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=projection_dim, eos_token_id=vocab["<|endoftext|>"],
        bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )


def _t5():
    """A T5 tokenizer from a tiny Unigram vocabulary (words and letters), and a 1-layer encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8, num_heads=2, num_layers=1))
    return tokenizer, encoder


def _image_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        scaling_factor=1.5, shift_factor=0.06, **extra,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random SD3, Flux and AudioLDM2 pipelines and a BLIP captioner, saved with
    `save_pretrained` (their loading goes through the generators' own code)."""
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        GPT2Config,
        GPT2LMHeadModel,
        RobertaTokenizer,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    root = tmp_path_factory.mktemp("generators")
    clip_tokenizer = _clip_tokenizer(root)
    torch.manual_seed(0)

    t5_tokenizer, t5 = _t5()
    StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip_tokenizer, 8)),
        tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_tokenizer, 8)),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    ).save_pretrained(root / "sd3")

    t5_tokenizer, t5 = _t5()
    FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config(clip_tokenizer, 16)),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    ).save_pretrained(root / "flux")

    # AudioLDM2: a byte-level RoBERTa tokenizer (the 256 byte symbols, no merges) for CLAP, T5 for
    # the second encoder, GPT-2 between them; a vocoder hop of 160 samples like the real one.
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *sorted(ByteLevel.alphabet())]
    (root / "roberta_vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (root / "roberta_merges.txt").write_text("#version: 0.2\n")
    roberta = RobertaTokenizer(str(root / "roberta_vocab.json"), str(root / "roberta_merges.txt"), model_max_length=77)
    t5_tokenizer, t5 = _t5()
    clap = ClapModel(ClapConfig(
        text_config={"vocab_size": len(symbols), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                         "max_position_embeddings": 80},
        audio_config={"spec_size": 64, "window_size": 4, "num_mel_bins": 64, "intermediate_size": 32, "depths": [1, 1],
                          "num_attention_heads": [2, 2], "num_hidden_layers": 2, "hidden_size": 16, "patch_size": 2,
                          "patch_stride": 2, "patch_embed_input_channels": 4},
        projection_dim=16,
    ))
    AudioLDM2Pipeline(
        vae=AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        ),
        text_encoder=clap,
        text_encoder_2=t5,
        projection_model=AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16),
        language_model=GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=len(symbols),
                                                  n_positions=99, bos_token_id=0, eos_token_id=2)),
        tokenizer=roberta,
        tokenizer_2=t5_tokenizer,
        feature_extractor=ClapFeatureExtractor(feature_size=64, sampling_rate=16000, hop_length=160, max_length_s=1,
                                               frequency_max=8000),
        unet=AudioLDM2UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=8, attention_head_dim=2, cross_attention_dim=([None, 16, 32], [None, 16, 32]),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False),
        # A larger init than the default 0.01 so that random weights give an audible clip.
        vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=16, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[8, 4, 5],
            upsample_kernel_sizes=[16, 8, 10], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
            normalize_before=False, initializer_range=0.1,
        )),
    ).save_pretrained(root / "audioldm2")

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    BlipForConditionalGeneration(BlipConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 16, "patch_size": 8},
        text_config={"vocab_size": len(words), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "encoder_hidden_size": 16, "max_position_embeddings": 32,
                         "bos_token_id": vocab["[DEC]"], "pad_token_id": vocab["[PAD]"], "sep_token_id": vocab["[SEP]"],
                         "eos_token_id": vocab["[SEP]"]},
        projection_dim=16,
    )).save_pretrained(root / "blip")
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 16, "width": 16}),
        tokenizer=BertTokenizer(vocab=vocab, model_max_length=32, bos_token="[DEC]"),
    ).save_pretrained(root / "blip")
    return {name: str(root / name) for name in ("sd3", "flux", "audioldm2", "blip")}


def _generator(modality: str, config: dict):
    return build_generator(modality, getattr(GeneratorsConfig.model_validate({modality: config}), modality))


# ---- diffusers and transformers generators -------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_text_to_image_png_provenance_and_seeds(checkpoints, kind):
    config = {"type": kind, "path": checkpoints[kind], "steps": 2, "guidance_scale": 3.0, "height": 16, "width": 32,
              "max_sequence_length": 16}
    if kind == "sd3":
        config["negative_prompt"] = "blurry"
    gen = _generator("image", config)
    first = gen.generate(["a red circle", "a big blue square", "  "], [11, 12, 13])
    assert [type(o) for o in first] == [bytes, bytes, Failure] and first[2].reason == "caption is empty"
    assert decode_image(first[0]).size == (32, 16)
    assert first[0] != first[1]
    again = gen.generate(["a big blue square", "a red circle"], [12, 11])  # other batch, other order
    assert again == [first[1], first[0]], "same seed -> identical bytes"
    assert gen.generate(["a red circle"], [99])[0] != first[0]
    provenance = gen.provenance(11)
    pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[kind]
    assert provenance["generator"] == f"diffusers:{pipeline}" and provenance["checkpoint"] == checkpoints[kind]
    assert provenance["seed"] == 11 and json.loads(provenance["parameters"])["steps"] == 2


def test_text_to_audio_flac_at_the_vocoder_rate(checkpoints):
    gen = _generator("audio", {"type": "audioldm2", "path": checkpoints["audioldm2"], "steps": 2,
                               "audio_length_in_s": 0.5, "max_new_tokens": 4, "audio_format": "FLAC"})
    first = gen.generate(["a low tone", "", "three short beeps"], [5, 6, 7])
    assert isinstance(first[1], Failure)
    wave, rate = decode_audio(first[0])
    assert first[0][:4] == b"fLaC" and rate == 16000 and wave.shape == (8000,)
    assert gen.generate(["three short beeps"], [7]) == [first[2]], "same seed -> identical bytes"
    assert gen.generate(["a low tone"], [8])[0] != first[0]
    assert gen.provenance(5)["generator"] == "diffusers:AudioLDM2Pipeline"
    assert json.loads(gen.provenance(5)["parameters"])["negative_prompt"] == "Low quality."


def test_captioner_captions_and_rejects_bad_images(checkpoints):
    gen = _generator("caption", {"type": "image-to-text", "path": checkpoints["blip"], "prompt": "a picture of",
                                 "max_new_tokens": 6})
    images = [encode_image(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)) for i in range(2)]
    out = gen.generate([images[0], b"not an image", images[1]], [1, 2, 3])
    assert isinstance(out[0], str) and out[0].startswith("a picture of") and len(out[0]) > len("a picture of")
    assert isinstance(out[1], Failure) and "could not be decoded" in out[1].reason
    assert gen.generate([images[1]], [3]) == [out[2]]
    assert gen.provenance(1)["generator"] == "transformers:BlipForConditionalGeneration"


def test_fill_batch_sets_flags_provenance_and_passes_rows_through(checkpoints):
    records = make_records(3, seed=0)
    rows = [
        {"key": "s/0/0", "image": None, "caption": records[0]["caption"], "audio": records[0]["audio"]},
        {"key": "s/0/1", "image": records[1]["image"], "caption": records[1]["caption"], "audio": records[1]["audio"]},
        {"key": "s/0/2", "image": None, "caption": "", "audio": records[2]["audio"]},
    ]
    curated = pa.Table.from_pylist([{**r, "source": "s", "shard": "0", "sample_id": r["key"], "source_weight": 1.0,
                                     "schema_version": SCHEMA_VERSION} for r in rows], schema=CURATED_SAMPLE)
    gen = _generator("image", {"type": "sd3", "path": checkpoints["sd3"], "steps": 1, "height": 16, "width": 16,
                               "max_sequence_length": 8})
    out = fill_batch(start_rows(curated, ["image"]), gen, base_seed=3).to_pylist()
    assert out[0]["image_synthetic"] and decode_image(out[0]["image"]).size == (16, 16)
    assert out[0]["image_provenance"]["seed"] == row_seed(3, "s/0/0")
    assert pa.array([out[0]["image_provenance"]], PROVENANCE).type == PROVENANCE
    assert not out[1]["image_synthetic"] and out[1]["image"] == records[1]["image"] and out[1]["image_provenance"] is None
    assert "caption is empty" in out[2]["reject_reason"] and out[2]["image"] is None


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _generator("image", {"type": "sd3", "path": str(tmp_path / "nowhere")})


def test_config_names_the_bad_field():
    with pytest.raises(ValidationError, match="image"):
        GeneratorsConfig.model_validate({"image": {"type": "audioldm2", "path": "x"}})
    with pytest.raises(ValidationError, match="height=100"):
        GeneratorsConfig.model_validate({"image": {"type": "flux", "path": "x", "height": 100}})
    with pytest.raises(ValidationError, match="stepz"):
        GeneratorsConfig.model_validate({"audio": {"type": "audioldm2", "path": "x", "stepz": 3}})
    with pytest.raises(ValueError, match="cannot fill image"):
        build_generator("image", {"type": "image-to-text", "path": "x"})


# ---- the ShapesWorld renderer ----------------------------------------------------------------


def test_shapesworld_renders_what_the_checkers_read_back():
    records = make_records(40, seed=5)
    seeds = [row_seed(0, r["id"]) for r in records]
    truth = [(r["colour"], r["shape"]) for r in records]
    image = _generator("image", {"type": "shapesworld"})
    audio = _generator("audio", {"type": "shapesworld", "audio_format": "WAV"})
    caption = _generator("caption", {"type": "shapesworld"})
    pngs = image.generate([r["caption"] for r in records], seeds)
    wavs = audio.generate([r["caption"] for r in records], seeds)
    captions = caption.generate([r["image"] for r in records], seeds)
    reads = {
        "image": read_image([np.asarray(decode_image(b)) for b in pngs]),
        "audio": read_audio([decode_audio(b)[0] for b in wavs]),
        "caption": read_caption(captions),
    }
    for modality, reading in reads.items():
        agree = np.mean([r == t for r, t in zip(zip(reading.colours, reading.shapes), truth)])
        assert agree >= 0.95, modality
    assert wavs[0][:4] == b"RIFF" and decode_image(pngs[0]).size == (32, 32)
    assert image.generate([records[0]["caption"]], seeds[:1]) == pngs[:1], "same seed -> identical bytes"
    assert image.generate([records[0]["caption"]], [seeds[0] + 1]) != pngs[:1]
    provenance = json.loads(image.provenance(1)["parameters"])
    assert image.provenance(1)["generator"] == "shapesworld-renderer" and "stands_in_for" in provenance


def test_shapesworld_keeps_the_captions_layout_and_rejects_what_it_cannot_read():
    image = _generator("image", {"type": "shapesworld"})
    png, no_concept = image.generate(["a big red circle in the top left", "a photo of a dog"], [1, 2])
    layout = read_layout([np.asarray(decode_image(png))])
    assert (layout.sizes[0], layout.positions[0]) == ("big", "top left")
    assert isinstance(no_concept, Failure) and "names no ShapesWorld concept" in no_concept.reason
    blank = encode_image(np.full((32, 32, 3), 40, np.uint8))  # grey, no shape
    out = _generator("caption", {"type": "shapesworld"}).generate([blank], [0])
    assert isinstance(out[0], Failure) and "no ShapesWorld shape" in out[0].reason
