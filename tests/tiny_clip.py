"""Tiny random CLIP text towers in SD3's pipeline layout, for the pooled encoders and the training
option that reads their hidden states."""

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer


def write_clip_text_towers(root: Path, *, hidden_size: int = 16, projections: tuple[int, int] = (8, 12),
                           seed: int = 0) -> Path:
    """`text_encoder/`, `text_encoder_2/` (`CLIPTextModelWithProjection`, one layer of width
    `hidden_size`, projecting to `projections`) and `tokenizer/`, `tokenizer_2/` (a character-level
    CLIP BPE vocabulary) under `root`."""
    torch.manual_seed(seed)
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    for i, (sub, width) in enumerate((("text_encoder", projections[0]), ("text_encoder_2", projections[1]))):
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
            eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )
        CLIPTextModelWithProjection(config).save_pretrained(root / sub)
        tokenizer.save_pretrained(root / ("tokenizer" if i == 0 else "tokenizer_2"))
    return root
