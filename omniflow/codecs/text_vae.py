"""The text VAE: captions <-> a (num_queries, latent_dim) latent, OmniFlow's text codec.

Architecture (as in the OmniFlow release, whose text VAE pairs Flan-T5-large with TinyLlama):

- **Encoder**: a `T5EncoderModel` reads the caption, padded to `max_length` tokens (77 in the
  release). Each token's feature vector is standardised over its channels,
  `(h - mean) / (std + 1e-9)` with the unbiased std, because T5's raw feature scale varies a lot.
  The release passes no attention mask (padding is encoded too); `mask_padding=True` masks it.
- **Q-Former**: a `Blip2QFormerModel` whose `num_queries` learned query vectors (32 in the
  release) cross-attend to those features.
- **Posterior**: a linear `vae_proj` maps each query to `2 * latent_dim` numbers, split into a
  mean and a log-variance. The latent is the mean passed through `q_norm`, a LayerNorm without
  affine parameters (or an RMSNorm), so every latent token has zero mean and unit variance over its
  `latent_dim` (1536 in the release) channels, times `latent_scale` (1.0). The release never uses
  the log-variance (its "sample" adds uniform noise of size 1e-3); it is kept so its weights load.
  With `pre_norm=True` the norm is applied to the Q-Former output before `vae_proj` instead.
- **Decoder**: a `LlamaForCausalLM` reads `[input_proj(latent / latent_scale), BOS, tokens, EOS]`:
  the latent is a prefix of `num_queries` input embeddings (`input_proj` is the identity when the
  LM is `latent_dim` wide), BOS sits at position `num_queries`, and the caption is generated after
  it. Decoding here is greedy or beam search through `generate(inputs_embeds=...)`.

Empty strings are encoded like any other caption (T5 sees only its EOS), as the release does at
latent_dim 1536 (at other sizes it zeroes an empty prompt's T5 features before the Q-Former). The
"no text" latent that guidance uses (all zeros in the release, its `drop=True`) is the caller's
business, not this model's.

Directory layout written by `TextVAE.save_pretrained` and read by `TextVAE.from_pretrained`:

    text_vae_config.json   TextVAEConfig (sizes, and where each component lives)
    text_vae.safetensors   the glue: query, vae_proj, input_proj, q_norm (when it has weights)
    encoder/  qformer/  decoder/  tokenizer_encoder/  tokenizer_decoder/   save_pretrained dirs

A component entry in the config is a subfolder of the directory when one of that name exists
there, and otherwise a local directory or hub id of its own (e.g. "google/flan-t5-large").
Mapping the release's weights onto this module: `omniflow.codecs.text_vae_reference`.

Example:
    >>> vae = TextVAE.from_pretrained("models/shapes-text-vae")  # doctest: +SKIP
    >>> vae.encode(["a small red circle on the left"]).shape  # doctest: +SKIP
    torch.Size([1, 8, 32])
    >>> vae.decode(vae.encode(["a small red circle on the left"]), num_beams=3)  # doctest: +SKIP
    ['a small red circle on the left']
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    Blip2QFormerModel,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

from omniflow.codecs.base import Codec, CodecConfig, load_pretrained, register_codec
from omniflow.modality import Modality

CONFIG_FILE = "text_vae_config.json"
WEIGHTS_FILE = "text_vae.safetensors"
COMPONENTS = ("encoder", "qformer", "decoder", "tokenizer_encoder", "tokenizer_decoder")
FEATURE_STD_EPS = 1e-9  # the release adds this to the per-token std of the T5 features
RMS_NORM_EPS = 1e-6


class TextVAEConfig(BaseModel):
    """Sizes and behaviour of a text VAE, and where its five components live."""

    model_config = ConfigDict(extra="forbid")
    num_queries: int = Field(32, ge=1, description="latent tokens (Q-Former queries)")
    latent_dim: int = Field(1536, ge=1, description="channels per latent token")
    max_length: int = Field(77, ge=2, description="encoder tokens, and the longest decoded caption")
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    pre_norm: bool = Field(False, description="normalise the Q-Former output instead of the mean")
    latent_scale: float = Field(1.0, gt=0)
    mask_padding: bool = Field(False, description="mask encoder padding (the release does not)")
    zero_empty: bool = Field(False, description="zero an empty caption's encoder features (the release "
                             "does for text VAEs whose latent_dim is not 1536)")
    encoder: str = "encoder"
    qformer: str = "qformer"
    decoder: str = "decoder"
    tokenizer_encoder: str = "tokenizer_encoder"
    tokenizer_decoder: str = "tokenizer_decoder"


@dataclass
class TextPosterior:
    """The encoder's output: latent mean (normalised, scaled) and the unused log-variance."""

    mean_BQD: torch.Tensor
    logvar_BQD: torch.Tensor


@dataclass
class DecoderTargets:
    """Teacher-forcing inputs `[BOS, tokens, EOS, pad...]` and labels (-100 where ignored)."""

    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor


def check_texts(texts: Sequence[str]) -> list[str]:
    """A batch of captions as a list; a bare string or a non-string item is a user error."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single string; wrap it in a list")  # noqa: TRY004 (callers answer ValueError as bad input)
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; got items of type {sorted(set(bad))}")
    return texts


def standardize_features(h_BLC: torch.Tensor) -> torch.Tensor:
    """Per-token standardisation over channels, computed in float32 for stability."""
    h = h_BLC.float()
    h = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + FEATURE_STD_EPS)
    return h.to(h_BLC.dtype)


class TextVAE(nn.Module):
    """T5 encoder -> Q-Former -> normalised latent -> Llama decoder with the latent as a prefix."""

    def __init__(
        self,
        config: TextVAEConfig,
        *,
        encoder: T5EncoderModel,
        qformer: Blip2QFormerModel,
        decoder: LlamaForCausalLM,
        tokenizer_encoder: PreTrainedTokenizerBase,
        tokenizer_decoder: PreTrainedTokenizerBase,
    ):
        super().__init__()
        if qformer.config.encoder_hidden_size != encoder.config.d_model:
            raise ValueError(
                f"qformer.encoder_hidden_size={qformer.config.encoder_hidden_size} must equal the "
                f"encoder's d_model={encoder.config.d_model}"
            )
        if tokenizer_decoder.bos_token_id is None or tokenizer_decoder.eos_token_id is None:
            raise ValueError("tokenizer_decoder needs both a BOS and an EOS token")
        self.config = config
        self.encoder, self.qformer, self.decoder = encoder, qformer, decoder
        self.tokenizer_encoder, self.tokenizer_decoder = tokenizer_encoder, tokenizer_decoder
        q_width, lm_width = qformer.config.hidden_size, decoder.config.hidden_size
        self.query = nn.Parameter(torch.randn(1, config.num_queries, q_width))
        self.vae_proj = nn.Linear(q_width, 2 * config.latent_dim)
        norm_dim = q_width if config.pre_norm else config.latent_dim
        self.q_norm = (
            nn.RMSNorm(norm_dim, eps=RMS_NORM_EPS)
            if config.norm_type == "rms_norm"
            else nn.LayerNorm(norm_dim, elementwise_affine=False)
        )
        self.input_proj = (
            nn.Linear(config.latent_dim, lm_width)
            if lm_width != config.latent_dim
            else nn.Identity()
        )

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.num_queries, self.config.latent_dim)

    @property
    def device(self) -> torch.device:
        return self.query.device

    # -- encoding ---------------------------------------------------------------------------------

    def tokenize_encoder(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encoder token ids and mask, padded and truncated to `max_length` as the release does."""
        batch = self.tokenizer_encoder(
            check_texts(texts),
            padding="max_length",
            max_length=self.config.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def posterior(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  empty_B: torch.Tensor | None = None) -> TextPosterior:
        """Encoder token ids and mask (B, L) -> latent mean (normalised, scaled), log-variance.
        `empty_B` marks empty captions, whose features are zeroed when the config says `zero_empty`."""
        mask = attention_mask if self.config.mask_padding else None
        feats_BLC = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        feats_BLC = standardize_features(feats_BLC)
        if self.config.zero_empty and empty_B is not None:
            feats_BLC = feats_BLC * ~empty_B.to(feats_BLC.device).view(-1, 1, 1)
        query_BQH = self.query.expand(input_ids.shape[0], -1, -1)
        h_BQH = self.qformer(
            query_embeds=query_BQH, encoder_hidden_states=feats_BLC, encoder_attention_mask=mask
        ).last_hidden_state
        if self.config.pre_norm:
            h_BQH = self.q_norm(h_BQH)
        mean_BQD, logvar_BQD = self.vae_proj(h_BQH).chunk(2, dim=-1)
        if not self.config.pre_norm:
            mean_BQD = self.q_norm(mean_BQD)
        return TextPosterior(mean_BQD * self.config.latent_scale, logvar_BQD)

    def encode(
        self,
        texts: Sequence[str],
        *,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Captions -> latents (B, num_queries, latent_dim): the posterior mean, plus Gaussian noise
        of `noise_std` when asked (the release's own "sample" adds uniform noise of size 1e-3)."""
        texts = check_texts(texts)
        if not texts:
            return self.query.new_zeros((0, *self.latent_shape))
        empty_B = torch.tensor([not t for t in texts])
        mean = self.posterior(**self.tokenize_encoder(texts), empty_B=empty_B).mean_BQD
        if noise_std > 0:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=torch.float32
            )
            mean = mean + noise_std * noise.to(mean.dtype)
        return mean

    # -- decoding ---------------------------------------------------------------------------------

    def prefix_embeds(self, latents_BQD: torch.Tensor) -> torch.Tensor:
        """Latents -> the decoder's prefix input embeddings (B, num_queries, lm_width)."""
        if latents_BQD.ndim != 3 or tuple(latents_BQD.shape[1:]) != self.latent_shape:
            want = ", ".join(map(str, self.latent_shape))
            raise ValueError(f"latents must be (B, {want}); got {tuple(latents_BQD.shape)}")
        return self.input_proj(latents_BQD / self.config.latent_scale)

    def tokenize_decoder(self, texts: Sequence[str]) -> DecoderTargets:
        """`[BOS, tokens, EOS]` per caption (tokens truncated to fit `max_length`), right-padded.

        Padding positions hold EOS as input (any valid id works: they are never attended to by a
        real position) and -100 as label, so the tokenizer needs no pad token.
        """
        tok = self.tokenizer_decoder
        ids = tok(
            check_texts(texts),
            add_special_tokens=False,
            truncation=True,
            max_length=self.config.max_length - 2,
        )["input_ids"]
        rows = [[tok.bos_token_id, *row, tok.eos_token_id] for row in ids]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.eos_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(row)
        return DecoderTargets(input_ids.to(self.device), labels.to(self.device))

    def reconstruction_loss(
        self, latents_BQD: torch.Tensor, targets: DecoderTargets
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of the caption given the latent prefix (BOS not scored)."""
        logits_BTV, labels_BT = self._next_token_logits(latents_BQD, targets)
        # one mean over every scored token: the arithmetic the toy text VAE's recipe was tuned with
        # (a per-caption reduction of the same sum trains a measurably different model on CPUs)
        return nn.functional.cross_entropy(
            logits_BTV.flatten(0, 1), labels_BT.flatten(), ignore_index=-100
        )

    def caption_nll(self, latents_BQD: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Per caption (B,), the mean next-token cross-entropy given its latent prefix; differentiable
        in the latents (training's text anchor, `omniflow.objective`)."""
        logits_BTV, labels_BT = self._next_token_logits(latents_BQD.to(self.query.dtype),
                                                        self.tokenize_decoder(texts))
        nll_BT = nn.functional.cross_entropy(
            logits_BTV.transpose(1, 2), labels_BT, ignore_index=-100, reduction="none"
        )
        return nll_BT.sum(1) / (labels_BT != -100).sum(1).clamp(min=1)

    def _next_token_logits(
        self, latents_BQD: torch.Tensor, targets: DecoderTargets
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's float32 logits for each next caption token (B, T-1, V), and its labels
        (B, T-1; -100 where not scored)."""
        prefix = self.prefix_embeds(latents_BQD)
        tokens = self.decoder.get_input_embeddings()(targets.input_ids_BT)
        hidden = self.decoder.model(
            inputs_embeds=torch.cat([prefix, tokens], dim=1)
        ).last_hidden_state
        logits_BTV = self.decoder.lm_head(hidden[:, prefix.shape[1] : -1]).float()
        return logits_BTV, targets.labels_BT[:, 1:]

    @torch.no_grad()
    def decode(
        self, latents_BQD: torch.Tensor, *, num_beams: int = 1, max_new_tokens: int | None = None
    ) -> list[str]:
        """Latents -> captions, by greedy (`num_beams=1`) or beam search; both are deterministic."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        tok = self.tokenizer_decoder
        prefix = self.prefix_embeds(latents_BQD.to(self.device, self.query.dtype))
        if prefix.shape[0] == 0:
            return []
        bos = self.decoder.get_input_embeddings()(
            torch.full((prefix.shape[0], 1), tok.bos_token_id, device=prefix.device)
        )
        embeds = torch.cat([prefix, bos], dim=1)
        generation = GenerationConfig(
            max_new_tokens=max_new_tokens or self.config.max_length,
            do_sample=False,
            num_beams=num_beams,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        new_tokens = self.decoder.generate(
            inputs_embeds=embeds, attention_mask=mask, generation_config=generation
        )
        return [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]

    # -- saving and loading -----------------------------------------------------------------------

    def glue_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that belong to no component: query, vae_proj, input_proj, q_norm."""
        skip = tuple(f"{c}." for c in ("encoder", "qformer", "decoder"))
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the directory layout in the module docstring; replaces `path` as a whole, so a
        reader never sees a half-written model."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for name in COMPONENTS:
                getattr(self, name).save_pretrained(tmp / name)
            glue = {k: v.detach().contiguous().cpu() for k, v in self.glue_state_dict().items()}
            save_file(glue, tmp / WEIGHTS_FILE)
            config = self.config.model_copy(update={name: name for name in COMPONENTS})
            (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = None) -> "TextVAE":
        """Load a directory written by `save_pretrained`: a local path or hub id (cached offline).

        Every component loads through `load_pretrained`, so a missing one raises
        `FileNotFoundError` naming it.
        """
        root = _resolve_dir(path, subfolder)
        config_file = root / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{str(config_file)!r} does not exist: {path!r} is not a text VAE directory"
            )
        config = TextVAEConfig.model_validate(json.loads(config_file.read_text()))
        loaders = {
            "encoder": T5EncoderModel.from_pretrained,
            "qformer": Blip2QFormerModel.from_pretrained,
            "decoder": LlamaForCausalLM.from_pretrained,
            "tokenizer_encoder": AutoTokenizer.from_pretrained,
            "tokenizer_decoder": AutoTokenizer.from_pretrained,
        }
        parts = {
            name: _load_component(fn, root, getattr(config, name)) for name, fn in loaders.items()
        }
        model = cls(config, **parts)
        weights = root / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"{str(weights)!r} does not exist: the text VAE at {path!r} is incomplete"
            )
        model.load_glue(load_file(weights), source=str(weights))
        return model.eval()

    def load_glue(self, glue: dict[str, torch.Tensor], *, source: str) -> None:
        """Load the glue weights; every glue parameter must be present with its shape."""
        expected = self.glue_state_dict()
        missing = sorted(set(expected) - set(glue))
        unexpected = sorted(set(glue) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: missing glue weights {missing}, unexpected {unexpected}")
        for key, value in glue.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(expected[key].shape)}"
                )
        self.load_state_dict(glue, strict=False)


def _resolve_dir(path: str, subfolder: str | None) -> Path:
    """`path` and `subfolder` as a local directory: as given, or a hub snapshot (cached offline)."""
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else None
        path = load_pretrained(lambda p: snapshot_download(p, allow_patterns=pattern), path)
    return Path(path) / subfolder if subfolder else Path(path)


def _load_component(loader: Callable[..., Any], root: Path, entry: str) -> Any:
    """A config entry: a subfolder of `root` if there is one, else a directory or hub id."""
    inside = root / entry
    if inside.is_dir():
        return load_pretrained(loader, str(inside))
    try:
        return load_pretrained(loader, entry)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"text VAE component {entry!r} is neither a subfolder {str(inside)!r} nor a checkpoint "
            f"of its own. {err}"
        ) from err


def _replace_dir(src: Path, dest: Path) -> None:
    """Move `src` to `dest`, replacing any existing `dest` with only renames visible to readers."""
    if not dest.exists():
        src.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    dest.rename(old)
    src.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


class TextVAECodecConfig(CodecConfig):
    """Codec config: a text VAE directory (`path`, `subfolder`) and the decoding settings."""

    num_beams: int = Field(1, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, description="defaults to the VAE's max_length")


TEXT_VAE_KIND = "omniflow-text-vae"


@register_codec(TEXT_VAE_KIND)
class TextVAECodec(Codec):
    """Captions <-> text-VAE latents (B, num_queries, latent_dim).

    Example:
        >>> codec = build_codec(  # doctest: +SKIP
        ...     {"kind": "omniflow-text-vae", "path": "models/shapes-text-vae", "num_beams": 3}
        ... )
        >>> codec.decode(codec.encode(["blue square"]))  # doctest: +SKIP
        ['blue square']
    """

    modality = Modality.TEXT
    config_class = TextVAECodecConfig

    def __init__(self, config: TextVAECodecConfig):
        super().__init__(config)
        vae = TextVAE.from_pretrained(config.path, subfolder=config.subfolder)
        self.vae = vae.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.vae.latent_shape

    @torch.inference_mode()
    def encode(self, media: Sequence[str]) -> torch.Tensor:
        """Captions -> latents (B, num_queries, latent_dim) on the codec's device and dtype."""
        return self.vae.encode(media)

    def null_latents(self) -> torch.Tensor:
        """The empty caption's latent."""
        return self.encode([""])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[str]:
        """Latents -> captions with the configured beam count."""
        return self.vae.decode(
            latents, num_beams=self.config.num_beams, max_new_tokens=self.config.max_new_tokens
        )
