"""Training a text VAE, and the tiny from-scratch text VAE that the ShapesWorld domain uses.

The OmniFlow release ships no recipe for its text VAE. This one trains every part end to end on
reconstruction: the next-token cross-entropy of a caption under the decoder, given the encoder's
latent of that same caption.

The regulariser is Gaussian latent noise, not a KL term. The latent is a LayerNorm'd mean, so its
scale is fixed by construction and a KL to N(0, I) would only move the log-variance, which nothing
uses. What the flow model downstream needs is a decoder that tolerates small errors in the latents
it is given, and training on `z = mean + latent_noise * eps` gives exactly that. The default, 0.03
per channel of a unit-variance latent, is the largest that let the tiny VAE converge within 500
steps on every seed tried (0.1 needs more); the release adds uniform noise of size 1e-3.

A tiny text VAE needs offline tokenizers: `build_word_tokenizer` makes a word-level one from the
training captions, so captions made of seen words round-trip exactly.

Example:
    >>> vae = build_tiny_text_vae(captions)                         # doctest: +SKIP
    >>> history = train_text_vae(vae, captions, steps=600, seed=0)  # doctest: +SKIP
    >>> round_trip(vae, held_out).exact_match                       # doctest: +SKIP
    1.0
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from omniflow.codecs.text_vae import DecoderTargets, TextVAE, TextVAEConfig, check_texts
from omniflow.lr import warmup_cosine

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)  # ids 0..3: pad 0 and EOS 1 as in T5


def build_word_tokenizer(
    texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = True
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation run in `texts`.

    `add_bos` / `add_eos` choose what `tokenizer(text)` wraps a caption in: T5 style (EOS only,
    the default) or Llama style (`add_bos=True, add_eos=False`). Decoding joins words with spaces
    and removes the space before punctuation. An unseen word becomes `<unk>`, which decoding with
    `skip_special_tokens=True` drops.

    Example:
        >>> tok = build_word_tokenizer(["a red circle", "blue square"])
        >>> tok.decode(tok("a blue circle")["input_ids"], skip_special_tokens=True)
        'a blue circle'
    """
    pre = Whitespace()
    words = sorted({w for t in check_texts(texts) for w, _ in pre.pre_tokenize_str(t)})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    template = " ".join([BOS] * add_bos + ["$A"] + [EOS] * add_eos)
    tokenizer.post_processor = TemplateProcessing(
        single=template, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK
    )


def build_tiny_text_vae(
    texts: Sequence[str],
    *,
    num_queries: int = 8,
    latent_dim: int = 32,
    width: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int | None = None,
    seed: int = 0,
) -> TextVAE:
    """A randomly initialised text VAE of the real classes, sized for CPU training in seconds.

    The default latent, 8 tokens x 32 channels, is the `toy` transformer preset's text stream.
    Its tokenizers are word-level ones built from `texts`; `max_length` defaults to the longest
    caption's token count plus room for BOS/EOS. The global RNG is left untouched.

    Example:
        >>> vae = build_tiny_text_vae(["a small red circle", "blue square"])
        >>> vae.latent_shape
        (8, 32)
    """
    if width % num_heads:
        raise ValueError(f"width={width} must be a multiple of num_heads={num_heads}")
    tok_enc = build_word_tokenizer(texts)
    tok_dec = build_word_tokenizer(texts, add_bos=True, add_eos=False)
    if max_length is None:
        # encoder ids are words + EOS; the decoder needs words + BOS + EOS; one spare
        max_length = max(len(ids) for ids in tok_enc(list(texts))["input_ids"]) + 2
    vocab = len(tok_enc)
    # Masking the encoder's padding (the release does not) makes a tiny VAE learn far faster.
    config = TextVAEConfig(
        num_queries=num_queries, latent_dim=latent_dim, max_length=max_length, mask_padding=True
    )
    ids = {"pad_token_id": tok_enc.pad_token_id, "eos_token_id": tok_enc.eos_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(
            T5Config(
                vocab_size=vocab,
                d_model=width,
                d_kv=width // num_heads,
                d_ff=2 * width,
                num_layers=num_layers,
                num_heads=num_heads,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
                decoder_start_token_id=0,
                **ids,
            )
        )
        qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=width,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=2 * width,
                encoder_hidden_size=width,
                cross_attention_frequency=1,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
        decoder = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_heads,
                max_position_embeddings=num_queries + max_length + 8,
                bos_token_id=tok_dec.bos_token_id,
                **ids,
            )
        )
        vae = TextVAE(
            config,
            encoder=encoder,
            qformer=qformer,
            decoder=decoder,
            tokenizer_encoder=tok_enc,
            tokenizer_decoder=tok_dec,
        )
    return vae.eval()


@dataclass
class TrainHistory:
    """Mean loss over each logging window, the step it ends at, and the total wall time."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_text_vae(
    model: TextVAE,
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    latent_noise: float = 0.03,
    weight_decay: float = 0.01,
    seed: int = 0,
    generator: torch.Generator | None = None,
    log_every: int = 100,
    progress: Callable[[int, float], None] | None = None,
) -> TrainHistory:
    """Train every part of `model` on caption reconstruction through a noisy latent.

    Batches are drawn with replacement by `generator` (one seeded with `seed` if none is given),
    which also draws the latent noise, so a run on the same machine is reproducible.
    `progress(step, mean_loss)` is called every `log_every` steps and after the last one.

    Example:
        >>> history = train_text_vae(vae, captions, steps=600, log_every=100)  # doctest: +SKIP
        >>> history.losses[-1] < history.losses[0]                             # doctest: +SKIP
        True
    """
    texts = check_texts(texts)
    if not texts:
        raise ValueError("texts is empty: there is nothing to train on")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    encoder_inputs = model.tokenize_encoder(texts)
    targets = model.tokenize_decoder(texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total=steps, warmup=max(1, steps // 20))
    )
    history, window, start = TrainHistory(), [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(texts), (batch_size,), generator=generator).to(model.device)
        posterior = model.posterior(
            encoder_inputs["input_ids"][idx], encoder_inputs["attention_mask"][idx]
        )
        noise = torch.randn(posterior.mean_BQD.shape, generator=generator).to(posterior.mean_BQD)
        loss = model.reconstruction_loss(
            posterior.mean_BQD + latent_noise * noise, _batch_targets(targets, idx)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.steps.append(step)
            history.losses.append(sum(window) / len(window))
            window = []
            if progress is not None:
                progress(step, history.losses[-1])
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _batch_targets(targets: DecoderTargets, idx: torch.Tensor) -> DecoderTargets:
    """Rows `idx` of the decoder targets, trimmed to the longest of them."""
    labels = targets.labels_BT[idx]
    width = int((labels != -100).sum(1).max())
    return DecoderTargets(targets.input_ids_BT[idx, :width], labels[:, :width])


@dataclass
class RoundTrip:
    """Decoded captions and the fraction equal to their source (whitespace-normalised)."""

    decoded: list[str]
    exact_match: float


def normalize_caption(text: str) -> str:
    """Collapse runs of whitespace, so that spacing alone never counts as a mismatch."""
    return " ".join(text.split())


@torch.no_grad()
def round_trip(
    model: TextVAE, texts: Sequence[str], *, batch_size: int = 256, num_beams: int = 1
) -> RoundTrip:
    """`decode(encode(texts))` in batches, and how often it reproduces each caption exactly."""
    texts = check_texts(texts)
    if not texts:
        raise ValueError("texts is empty")
    decoded: list[str] = []
    for i in range(0, len(texts), batch_size):
        decoded += model.decode(model.encode(texts[i : i + batch_size]), num_beams=num_beams)
    hits = sum(
        normalize_caption(a) == normalize_caption(b) for a, b in zip(decoded, texts, strict=True)
    )
    return RoundTrip(decoded=decoded, exact_match=hits / len(texts))
