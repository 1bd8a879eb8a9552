"""Build, cache and load the toy codecs that ShapesWorld runs on.

The toy codecs are the real codec classes at tiny sizes, trained here on ShapesWorld: an
`AutoencoderKL` for 32x32 images, an `AutoencoderKL` over AudioLDM2-style log-mels with a
Griffin-Lim vocoder, and a text VAE (T5 encoder, Q-Former, Llama decoder). `build_toy_codecs`
trains them, measures round-trip accuracy with the ShapesWorld checkers (the concept read from
decode(encode(x)) against the truth) and writes `codecs.json`; a rerun with the same config reuses
the directory, a changed config rebuilds it.
"""

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from omniflow.codecs import build_codec, read_codec_set
from omniflow.codecs.autoencoder import fit_latent_stats, new_autoencoder_kl, train_autoencoder_kl
from omniflow.codecs.base import CODEC_SET
from omniflow.codecs.mel import TOY_MEL, MelConfig, log_mel
from omniflow.codecs.text_vae_train import build_tiny_text_vae, train_text_vae
from omniflow.config import config_hash
from omniflow.modality import Modality
from shapesworld import (
    all_concepts,
    concept_accuracy,
    read_audio,
    read_caption,
    read_image,
    render_audio,
    render_captions,
    render_images,
    sample_concepts,
    sample_scenes,
)
from shapesworld.toy.cache import cached_manifest, commit, new_staging

MANIFEST = CODEC_SET  # the build's manifest is also its codec set index
# Part of the cache key: bump when the build writes something different for the same config.
BUILD_VERSION = 3  # 2: per-channel latent normalisation; 3: audio trained on clips as the sources render them


class ImageVAEBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 32
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    steps: int = Field(500, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = 4e-3
    kl_weight: float = 1e-4
    reconstruction_loss: Literal["l1", "mse"] = "mse"


class MelVAEBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mel: MelConfig = TOY_MEL
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (8, 16, 32)
    # 300 steps: the round trip of 1 s clips fell below 0.98 in some builds; 600: 0.975 on some CPUs
    # (the one-thread build of `build-codecs`' pool), 1.0 on others; 900: 0.995 and 1.0 there
    steps: int = Field(900, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = 3e-3
    kl_weight: float = 1e-4
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    griffin_lim_iters: int = Field(16, gt=0)


class TextVAEBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_queries: int = 8
    latent_dim: int = 32
    width: int = 64
    num_layers: int = 2
    steps: int = Field(500, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = 3e-3


class ToyCodecsConfig(BaseModel):
    """Everything that decides the toy codecs; its hash keys the cache."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    train_samples: int = Field(2000, gt=0)
    eval_samples: int = Field(200, gt=0)
    image: ImageVAEBuild = Field(default_factory=ImageVAEBuild)
    audio: MelVAEBuild = Field(default_factory=MelVAEBuild)
    text: TextVAEBuild = Field(default_factory=TextVAEBuild)

    def digest(self) -> str:
        return config_hash(self, version=BUILD_VERSION)


@dataclass(frozen=True)
class ShapesData:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    waves: np.ndarray  # (N, samples) float32
    concepts: list


def shapes_data(n: int, *, seed: int, image_size: int, mel: MelConfig) -> ShapesData:
    """n ShapesWorld triplets over every concept, audio as ShapesWorld renders it (`DURATION_S`, as
    every source and held-out scene has it; the codec's front end pads it to the mel config's clip),
    so that the codecs learn the data they will encode."""
    scenes = sample_scenes(sample_concepts(n, seed=seed, pairs=all_concepts()), seed=seed)
    return ShapesData(
        images=render_images(scenes, size=image_size),
        captions=render_captions(scenes),
        waves=render_audio(scenes, sample_rate=mel.sample_rate),
        concepts=[s.concept for s in scenes],
    )


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _train_vae(vae, data: torch.Tensor, cfg: "ImageVAEBuild | MelVAEBuild", seed: int, log: Callable, name: str) -> None:
    """Train `vae` on `data` as `cfg` says, logging five times, then fit its latent statistics."""
    every = max(1, cfg.steps // 5)
    train_autoencoder_kl(
        vae, data, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, kl_weight=cfg.kl_weight,
        reconstruction_loss=cfg.reconstruction_loss, seed=seed,
        progress=lambda s, loss: (s + 1) % every == 0 and log(f"{name} step {s + 1}/{cfg.steps} loss {loss:.4f}"),
    )
    fit_latent_stats(vae, data)


def _build_image(out: Path, cfg: ImageVAEBuild, train: ShapesData, seed: int, log: Callable) -> dict:
    vae = new_autoencoder_kl(
        channels=3, latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
        sample_size=cfg.size, seed=seed,
    )
    data = _pixels(train.images) * 2 - 1  # the VAE's input range, as the image codec feeds it
    _train_vae(vae, data, cfg, seed, log, "image VAE")
    vae.save_pretrained(out / "image_vae")
    return {"kind": "image-vae", "path": "image_vae", "resolution": cfg.size}


def _build_audio(out: Path, cfg: MelVAEBuild, train: ShapesData, seed: int, log: Callable) -> dict:
    codec_config = {
        "kind": "mel-vae", "path": "audio", "mel": cfg.mel.model_dump(), "griffin_lim_iters": cfg.griffin_lim_iters,
    }
    vae = new_autoencoder_kl(
        channels=1, latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
        sample_size=cfg.mel.num_frames, seed=seed,
    )
    # the codec's own front end (peak normalisation, padding) makes the training mels
    waves = _codec_waves(train.waves, cfg)
    mels = log_mel(waves, cfg.mel)
    _train_vae(vae, mels, cfg, seed, log, "mel VAE")
    vae.save_pretrained(out / "audio" / "vae")
    return codec_config


def _codec_waves(waves: np.ndarray, cfg: MelVAEBuild) -> torch.Tensor:
    from omniflow.codecs.audio import prepare_waveform

    return torch.from_numpy(np.stack([prepare_waveform((w, cfg.mel.sample_rate), cfg.mel) for w in waves]))


def _build_text(out: Path, cfg: TextVAEBuild, train: ShapesData, seed: int, log: Callable) -> dict:
    vae = build_tiny_text_vae(
        train.captions, num_queries=cfg.num_queries, latent_dim=cfg.latent_dim, width=cfg.width,
        num_layers=cfg.num_layers, seed=seed,
    )
    train_text_vae(
        vae, train.captions, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
        log_every=max(1, cfg.steps // 5),
        progress=lambda s, loss: log(f"text VAE step {s}/{cfg.steps} loss {loss:.4f}"),
    )
    vae.save_pretrained(out / "text_vae")
    return {"kind": "omniflow-text-vae", "path": "text_vae"}


# longest first: beside the toy CLIP in a pool of two, the four builds end together
_PARTS = {"audio": _build_audio, "image": _build_image, "text": _build_text}


def _print_log(message: str) -> None:
    print(f"[codecs] {message}", flush=True)


def _build_part(modality: str, staging: Path, config: ToyCodecsConfig, train: ShapesData,
                log: Callable[[str], None]) -> tuple[dict, float]:
    """One modality's codec into `staging`: its codec config and the seconds it took. Runs in this
    process or in a worker of `build_toy_codecs`'s pool."""
    start = time.perf_counter()
    codec = _PARTS[modality](staging, getattr(config, modality), train, config.seed, log)
    return codec, round(time.perf_counter() - start, 1)


def _resolve(config: dict, root: Path) -> dict:
    return {**config, "path": str(root / config["path"])}


def round_trip_accuracy(codecs: dict[Modality, object], data: ShapesData) -> dict[str, dict[str, float]]:
    """Concept accuracy of decode(encode(x)) per modality, read by the ShapesWorld checkers."""
    image, audio, text = codecs[Modality.IMAGE], codecs[Modality.AUDIO], codecs[Modality.TEXT]
    pixels = image.decode(image.encode(_pixels(data.images)))
    waves = audio.decode(audio.encode(audio.preprocess([(w, audio.sample_rate) for w in data.waves])))
    captions = text.decode(text.encode(data.captions))
    return {
        "image": concept_accuracy(read_image(image.to_uint8(pixels)), data.concepts),
        "audio": concept_accuracy(read_audio(waves.float().numpy(), audio.sample_rate), data.concepts),
        "text": concept_accuracy(read_caption(captions), data.concepts),
    }


def toy_codec_configs(root: str | Path) -> dict[str, dict]:
    """The codec configs in `root/codecs.json` with their paths made absolute: what `build_codec`
    (or a job's `codecs` setting) takes."""
    root = Path(root).resolve()
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{root} has no {MANIFEST}; build it with `python -m shapesworld.toy build-codecs --out {root}`")
    return read_codec_set(root)["codecs"]


def load_toy_codecs(root: str | Path) -> dict[Modality, object]:
    """The codecs described by `root/codecs.json`, loaded through the ordinary codec registry."""
    return {Modality(m): build_codec(c) for m, c in toy_codec_configs(root).items()}


def build_toy_codecs(
    out: str | Path, config: ToyCodecsConfig | None = None, *, force: bool = False, log: Callable[[str], None] = print,
    pool: Executor | None = None,
) -> dict:
    """Train the toy codecs into `out` (or reuse them when `out` holds this config's build).

    With a `pool` (`shapesworld.toy.pool.build_pool`) the three codecs train side by side in its
    worker processes, which print their progress; otherwise one after another here.

    Returns the manifest: codec configs (paths relative to `out`), latent shapes, round-trip
    accuracy per modality on fresh samples, timings and the config hash.

    Example:
        >>> manifest = build_toy_codecs("runs/demo/codecs")
        >>> manifest["round_trip"]["image"]["both"]   # share of concepts read back correctly
    """
    config = config or ToyCodecsConfig()
    out = Path(out)
    cached = cached_manifest(out, MANIFEST, config.digest(), force=force, what="toy codecs", log=log)
    if cached is not None:
        return cached
    staging = new_staging(out)

    start = time.perf_counter()
    train = shapes_data(config.train_samples, seed=config.seed, image_size=config.image.size, mel=config.audio.mel)
    if pool is None:
        built = {m: _build_part(m, staging, config, train, lambda msg: log(f"[codecs] {msg}")) for m in _PARTS}
    else:
        futures = {m: pool.submit(_build_part, m, staging, config, train, _print_log) for m in _PARTS}
        built = {m: future.result() for m, future in futures.items()}
    codecs = {m: codec for m, (codec, _) in built.items()}
    seconds = {m: s for m, (_, s) in built.items()}
    for m in _PARTS:
        log(f"[codecs] {m} codec built in {seconds[m]}s")

    loaded = {Modality(m): build_codec(_resolve(c, staging)) for m, c in codecs.items()}
    held_out = shapes_data(config.eval_samples, seed=config.seed + 1, image_size=config.image.size, mel=config.audio.mel)
    accuracy = round_trip_accuracy(loaded, held_out)
    manifest = {
        "config_hash": config.digest(),
        "config": config.model_dump(mode="json"),
        "codecs": codecs,
        "latent_shapes": {m.value: list(c.latent_shape) for m, c in loaded.items()},
        "round_trip": accuracy,
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
    }
    return commit(staging, out, MANIFEST, manifest)
