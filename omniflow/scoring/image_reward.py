"""ImageReward (Xu et al., NeurIPS 2023): a human-preference score of an image for its prompt.

The model is BLIP's image-grounded text encoder with a reward head: a ViT encodes the image, a
BERT encoder with cross-attention to the image tokens reads the prompt (35 tokens, padded), and a
stack of linear layers maps its first token to one number, normalised by the mean and standard
deviation the authors publish. Here the ViT is timm's `VisionTransformer` and the text encoder
transformers' `BlipTextModel` (both keep BLIP's weight layout), so the released checkpoint loads
as it is.

`path` is a directory (local; `jobs.evaluate` copies an `s3://` one first) holding the release's
files, `ImageReward.pt` and `med_config.json` (huggingface.co/THUDM/ImageReward), and the
bert-base-uncased tokenizer in `tokenizer/` (the release loads it from the hub at run time).
The architecture is read off the weights and `med_config.json`; only the ViT's head count is not
in them (`vision_heads`, default width / 64: 16 for the release's ViT-L/16).

    >>> reward = load_image_reward(ImageRewardConfig(path="models/ImageReward"))
    >>> reward.score(["a red bicycle"], [Image.open("bike.png")])  # (B,) float32
"""

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

WEIGHTS_FILE = "ImageReward.pt"
TEXT_CONFIG_FILE = "med_config.json"
TOKENIZER_DIR = "tokenizer"
# The release's normalisation of the head's output, and its prompt length in tokens.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."


class ImageRewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a directory with ImageReward.pt, med_config.json and tokenizer/")
    vision_heads: int | None = Field(None, ge=1, description="the ViT's attention heads (default: width / 64)")


class ImageReward(torch.nn.Module):
    """A loaded ImageReward model, its image preprocessing and its tokenizer."""

    def __init__(self, vision: VisionTransformer, text: BlipTextModel, head: Sequence[torch.nn.Linear],
                 tokenizer: BertTokenizer, image_size: int):
        super().__init__()
        self.vision, self.text, self.head = vision, text, torch.nn.ModuleList(head)
        self.tokenizer = tokenizer
        self.preprocess = transforms.Compose([
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ])

    @property
    def device(self) -> torch.device:
        return self.vision.cls_token.device

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        """The reward of each image for its prompt: (B,) float32."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        pixels_BCHW = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        image_BND = self.vision.forward_features(pixels_BCHW)
        text_BNC = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             encoder_hidden_states=image_BND,
                             encoder_attention_mask=torch.ones(image_BND.shape[:2], dtype=torch.long,
                                                               device=self.device)).last_hidden_state
        reward = text_BNC[:, 0].float()
        for layer in self.head:  # the release's head has no activations between its layers
            reward = layer(reward)
        return ((reward[:, 0] - REWARD_MEAN) / REWARD_STD).cpu()


def _vision_tower(weights: dict[str, torch.Tensor], heads: int | None) -> tuple[VisionTransformer, int]:
    width = weights["cls_token"].shape[-1]
    patch = weights["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(weights["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k)))
    vision = VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads or width // 64,
        mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / width,
        qkv_bias="blocks.0.attn.qkv.bias" in weights, num_classes=0, global_pool="")
    vision.load_state_dict(weights)
    return vision, grid * patch


def _text_tower(weights: dict[str, torch.Tensor], med: dict, vision_width: int,
                tokenizer: BertTokenizer) -> BlipTextModel:
    config = BlipTextConfig(
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=vision_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        is_decoder=True)  # BLIP's text layers hold cross-attention; the encoder runs them unmasked
    text = BlipTextModel(config, add_pooling_layer=False)
    text.load_state_dict({k: v for k, v in weights.items() if k != "embeddings.position_ids"})
    return text


def _head(weights: dict[str, torch.Tensor]) -> list[torch.nn.Linear]:
    layers = []
    for index in sorted({int(k.split(".")[0]) for k in weights}):
        weight = weights[f"{index}.weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": weights[f"{index}.bias"]})
        layers.append(layer)
    return layers


def load_image_reward(config: ImageRewardConfig | dict, *, device: str | torch.device = "cpu") -> ImageReward:
    """Load the model `config.path` holds, in eval mode; a missing file raises
    `FileNotFoundError` naming it and what to put there."""
    config = ImageRewardConfig.model_validate(config) if isinstance(config, dict) else config
    root = Path(config.path)
    for name in (WEIGHTS_FILE, TEXT_CONFIG_FILE, TOKENIZER_DIR):
        if not (root / name).exists():
            raise FileNotFoundError(
                f"ImageReward: {root / name} does not exist; the directory holds ImageReward.pt and "
                f"med_config.json from THUDM/ImageReward and the bert-base-uncased tokenizer in tokenizer/")
    state = torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    tokenizer = BertTokenizer.from_pretrained(root / TOKENIZER_DIR)
    # BLIP's tokenizer: bert-base-uncased with a decoder and an encoder token added
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    vision, image_size = _vision_tower(part(VISION), config.vision_heads)
    med = json.loads((root / TEXT_CONFIG_FILE).read_text())
    text = _text_tower(part(TEXT), med, vision.embed_dim, tokenizer)
    if len(tokenizer) > text.config.vocab_size:
        raise ValueError(f"ImageReward: the tokenizer in {root / TOKENIZER_DIR} has {len(tokenizer)} tokens, "
                         f"the text encoder {text.config.vocab_size}")
    model = ImageReward(vision, text, _head(part(HEAD)), tokenizer, image_size)
    return model.to(device).eval().requires_grad_(False)
