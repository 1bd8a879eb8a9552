"""The toy audio tower: ShapesWorld clips -> vectors in the toy CLIP's text space.

OmniFlow conditions audio inputs on a pooled vector from LanguageBind's audio encoder, a ViT over
log-mel spectrograms trained to meet a frozen CLIP text encoder. This is the same design at a toy
size: a transformers `CLIPVisionModelWithProjection` with one input channel reads the clip's
log-mel (`omniflow.codecs.pooled.mel_pixels`) and is trained with open_clip's `ClipLoss` against
the frozen toy CLIP's text embeddings of the clip's caption. It is saved with `save_pretrained` and
loads as the `mel-vit-audio-pooled` pooled encoder, like a released checkpoint of that class.
`build_toy_clip` builds it into `audio_tower/` beside the CLIP.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from omniflow.codecs.mel import TOY_MEL, log_mel
from omniflow.codecs.pooled import MelVitAudioPooled, MelVitAudioPooledConfig, mel_pixels
from omniflow.lr import warmup_cosine
from omniflow.scoring.clip import OpenClip
from shapesworld import (
    SAMPLE_RATE,
    all_concepts,
    render_audio,
    render_captions,
    sample_concepts,
    sample_scenes,
)

SUBFOLDER = "audio_tower"


class ToyAudioTowerBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train_samples: int = Field(4000, gt=0)
    eval_samples: int = Field(500, gt=0)
    image_size: int = Field(64, ge=16, description="the square the (mels x frames) spectrogram is resized to")
    patch_size: int = Field(8, gt=0)
    hidden_size: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    steps: int = Field(300, gt=0)
    batch_size: int = Field(128, gt=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(30, ge=0)


def new_audio_tower(cfg: ToyAudioTowerBuild, embed_dim: int, *, seed: int) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_channels=1, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=embed_dim,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config)


def _scenes(n: int, seed: int) -> list:
    return sample_scenes(sample_concepts(n, seed=seed, pairs=all_concepts()), seed=seed)


def _clips(scenes: Sequence) -> list[tuple[np.ndarray, int]]:
    return [(wave, SAMPLE_RATE) for wave in render_audio(scenes)]


def mel_statistics(scenes: Sequence) -> tuple[float, float]:
    """Mean and standard deviation of the log-mel values of `scenes`' clips (TOY_MEL)."""
    waves = torch.from_numpy(render_audio(scenes))
    padded = torch.nn.functional.pad(waves, (0, max(0, TOY_MEL.num_samples - waves.shape[-1])))
    spec = log_mel(padded, TOY_MEL)
    return float(spec.mean()), float(spec.std())


@torch.inference_mode()
def _embed_texts(clip: OpenClip, captions: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    return torch.cat([clip.embed_texts(list(captions[i : i + batch_size])) for i in range(0, len(captions), batch_size)])


def _pixels(scenes: Sequence, config: MelVitAudioPooledConfig, image_size: int, batch_size: int = 512) -> torch.Tensor:
    clips = _clips(scenes)
    return torch.cat([mel_pixels(clips[i : i + batch_size], config, image_size) for i in range(0, len(clips), batch_size)])


def train_audio_tower(
    tower: CLIPVisionModelWithProjection,
    pixels_N1SS: torch.Tensor,
    text_ND: torch.Tensor,
    cfg: ToyAudioTowerBuild,
    *,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Contrastive training of `tower` in place: its unit embeddings of row i's spectrogram against
    the fixed unit text embeddings of row i, with open_clip's symmetric `ClipLoss` and a learnt
    logit scale (clamped at 100). Returns every step's loss and leaves the tower in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()
    logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    optimizer = torch.optim.AdamW([*tower.parameters(), logit_scale], lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total=cfg.steps, warmup=min(cfg.warmup_steps, cfg.steps)))
    losses = []
    tower.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(pixels_N1SS), (cfg.batch_size,), generator=generator)
        audio_BD = torch.nn.functional.normalize(tower(pixel_values=pixels_N1SS[idx]).image_embeds, dim=-1)
        loss = loss_fn(audio_BD, text_ND[idx], logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    tower.eval()
    return losses


def tower_config(path: str, mean: float, std: float, pooled_dim: int) -> dict:
    """The `mel-vit-audio-pooled` config of a tower saved in `path`."""
    return {"kind": "mel-vit-audio-pooled", "path": path, "mel": TOY_MEL.model_dump(), "mel_mean": mean,
            "mel_std": std, "pooled_dim": pooled_dim}


@torch.inference_mode()
def audio_separation(encoder: MelVitAudioPooled, clip: OpenClip, n: int, *, seed: int) -> dict[str, float]:
    """How well clips' vectors match their own captions' over a caption of another concept (same
    wording), on `n` fresh scenes; `encoder` is the loaded `mel-vit-audio-pooled` encoder."""
    from shapesworld.toy.clip import auc, mismatched_captions

    scenes = _scenes(n, seed)
    audio = encoder.embed(_clips(scenes))[:, : clip.embed_dim]
    matched = (audio * _embed_texts(clip, render_captions(scenes))).sum(-1).numpy()
    mismatched = (audio * _embed_texts(clip, mismatched_captions(scenes, seed=seed))).sum(-1).numpy()
    return {"auc": auc(matched, mismatched), "per_clip": float((matched > mismatched).mean()),
            "matched_mean": float(matched.mean()), "mismatched_mean": float(mismatched.mean())}


def build_audio_tower(clip: OpenClip, cfg: ToyAudioTowerBuild, out: Path, *, seed: int,
                      log: Callable[[str], None] = print) -> dict:
    """Train the tower against `clip`'s text tower and save it in `out / SUBFOLDER`. Returns its
    pooled-encoder config (path relative to `out`) and held-out separation."""
    from omniflow.codecs import build_codec

    scenes = _scenes(cfg.train_samples, seed)
    mean, std = mel_statistics(scenes[:500])
    config = MelVitAudioPooledConfig.model_validate(tower_config(".", mean, std, clip.embed_dim))
    pixels = _pixels(scenes, config, cfg.image_size)
    texts = _embed_texts(clip, render_captions(scenes))
    tower = new_audio_tower(cfg, clip.embed_dim, seed=seed)
    every = max(1, cfg.steps // 5)
    losses = train_audio_tower(
        tower, pixels, texts, cfg, seed=seed,
        progress=lambda s, loss: (s + 1) % every == 0 and log(f"[audio tower] step {s + 1}/{cfg.steps} loss {loss:.4f}"))
    tower.save_pretrained(out / SUBFOLDER, safe_serialization=True)
    entry = tower_config(SUBFOLDER, mean, std, clip.embed_dim)
    encoder = build_codec({**entry, "path": str(out / SUBFOLDER)})  # loaded like released weights
    separation = audio_separation(encoder, clip, cfg.eval_samples, seed=seed + 5)
    log(f"[audio tower] held-out matched vs mismatched caption AUC {separation['auc']:.4f}")
    return {"entry": entry, "eval": separation, "final_loss": round(float(np.mean(losses[-max(1, cfg.steps // 20):])), 4)}
