"""LAION aesthetic predictors: small heads on CLIP image embeddings that predict a 1-10 rating.

Two released heads, both scoring L2-normalised CLIP ViT-L/14 image embeddings (OpenAI weights,
768 wide):

- v1, LAION-Aesthetics Predictor V1 (`LAION-AI/aesthetic-predictor`, `sa_0_4_vit_l_14_linear.pth`):
  one `nn.Linear(768, 1)`. The file is a `torch.save`d state dict with the keys `weight` (1, 768)
  and `bias` (1,). It was fit on clip-retrieval's embeddings, which are L2-normalised.
- v2, the improved predictor (`christophschuhmann/improved-aesthetic-predictor`,
  `sac+logos+ava1-l14-linearMSE.pth`): an `nn.Sequential` under the attribute `layers`:
  Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
  Linear(64, 16), Linear(16, 1), with no activations between them (identity: the head is affine
  at inference). Its state dict keys are `layers.{0,2,4,6,7}.{weight,bias}` (the dropouts hold no
  parameters); its reference inference normalises the embedding first.

Weights are read from a local path, a `file://` URL or, only when a user configures one, an
`http(s)://` URL; `.safetensors` files hold the same keys. Nothing is unpickled:
`torch.load(..., weights_only=True)`. The input width comes from the weights, so heads for other
CLIP widths (or the toy CLIP) load the same way.
"""

import io
import itertools
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

AestheticVersion = Literal["v1", "v2"]
V2_WIDTHS = (1024, 128, 64, 16)  # hidden widths of the improved predictor
V2_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three linears
URL_TIMEOUT_S = 60


class AestheticConfig(BaseModel):
    """Which LAION head to load and where its weights are (a path or a file/http(s) URL)."""

    model_config = ConfigDict(extra="forbid")
    version: AestheticVersion = "v2"
    weights: str = Field(min_length=1)


class AestheticHead(nn.Module):
    """L2-normalise a CLIP image embedding, then map it to a score: (B, D) -> (B,)."""

    version: AestheticVersion

    def forward(self, embeds_BD: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.normalize(embeds_BD.float(), dim=-1)).squeeze(-1)

    def head(self, unit_BD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearAestheticHead(AestheticHead):
    """LAION-Aesthetics V1: score = w . x / |x| + b."""

    version = "v1"

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.linear = nn.Linear(embed_dim, 1)

    def head(self, unit_BD: torch.Tensor) -> torch.Tensor:
        return self.linear(unit_BD)


class MLPAestheticHead(AestheticHead):
    """The improved predictor (v2): five linears with dropout after the first three, no
    activations. `layers` keeps the original's `nn.Sequential` indices, so its state dict keys are
    the released file's."""

    version = "v2"

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        widths = (embed_dim, *V2_WIDTHS)
        modules: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            modules.append(nn.Linear(w_in, w_out))
            if i < len(V2_DROPOUTS):
                modules.append(nn.Dropout(V2_DROPOUTS[i]))
        modules.append(nn.Linear(widths[-1], 1))
        self.layers = nn.Sequential(*modules)

    def head(self, unit_BD: torch.Tensor) -> torch.Tensor:
        return self.layers(unit_BD)


HEADS: dict[str, type[AestheticHead]] = {"v1": LinearAestheticHead, "v2": MLPAestheticHead}
# LAION's key -> this module's key. v2's module is laid out like the original, so it maps to itself.
V1_KEYS = {"weight": "linear.weight", "bias": "linear.bias"}
V2_LINEARS = (0, 2, 4, 6, 7)
V2_KEYS = {f"layers.{i}.{p}": f"layers.{i}.{p}" for i in V2_LINEARS for p in ("weight", "bias")}
LAION_KEYS: dict[str, dict[str, str]] = {"v1": V1_KEYS, "v2": V2_KEYS}


def new_aesthetic_head(version: AestheticVersion, embed_dim: int, *, seed: int = 0) -> AestheticHead:
    """A randomly initialised head (to train on a new CLIP's embeddings)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return HEADS[version](embed_dim)


def from_laion_state_dict(version: AestheticVersion, state: dict[str, torch.Tensor]) -> AestheticHead:
    """A head holding the weights of a LAION state dict (keys as documented above)."""
    mapping = LAION_KEYS[version]
    missing, unexpected = sorted(set(mapping) - set(state)), sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise ValueError(
            f"not a LAION aesthetic {version} state dict: missing keys {missing}, unexpected keys {unexpected}"
        )
    first = "weight" if version == "v1" else "layers.0.weight"
    head = HEADS[version](state[first].shape[1])
    head.load_state_dict({mapping[k]: v.float() for k, v in state.items()})
    return head.eval()


def to_laion_state_dict(head: AestheticHead) -> dict[str, torch.Tensor]:
    """The head's weights under LAION's key names (the inverse of `from_laion_state_dict`)."""
    ours = head.state_dict()
    return {laion: ours[mine].detach().cpu().contiguous() for laion, mine in LAION_KEYS[head.version].items()}


def save_aesthetic_head(head: AestheticHead, path: str | Path) -> None:
    """Write the head in LAION's key layout: safetensors for a `.safetensors` path, else torch.save."""
    state, path = to_laion_state_dict(head), Path(path)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)


def read_weights(location: str) -> dict[str, torch.Tensor]:
    """A state dict from a path, `file://` URL or `http(s)://` URL; `.safetensors` or torch.save."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in ("http", "https"):
        name = parsed.path
        try:
            with urllib.request.urlopen(location, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
        except OSError as err:
            raise FileNotFoundError(f"cannot fetch aesthetic weights from {location!r}: {err}") from err
    else:
        path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else location)
        if not path.is_file():
            raise FileNotFoundError(f"aesthetic weights {location!r}: no such file")
        name, data = path.name, path.read_bytes()
    if name.endswith(".safetensors"):
        return load_safetensors_bytes(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_aesthetic_head(config: AestheticConfig | dict) -> AestheticHead:
    """The head `config` names, with its weights, in eval mode.

    Example:
        >>> head = load_aesthetic_head({"version": "v2", "weights": "weights/sac+logos+ava1-l14-linearMSE.pth"})
        >>> head(clip.embed_images(pixels))  # (B,) scores, about 1-10
    """
    config = AestheticConfig.model_validate(config) if isinstance(config, dict) else config
    return from_laion_state_dict(config.version, read_weights(config.weights))


def train_aesthetic_head(
    head: AestheticHead,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit `head` in place to (N, D) embeddings and (N,) target scores with MSE and Adam (the
    improved predictor's recipe, dropout active). Returns the loss of every step; leaves the head in
    eval mode."""
    if embeddings.ndim != 2 or targets.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be (N, D) and targets (N,), got {tuple(embeddings.shape)} and {tuple(targets.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    embeddings, targets = embeddings.float(), targets.float()
    losses = []
    head.train()
    with torch.random.fork_rng():  # dropout draws from the global generator: seed it, then restore it
        torch.manual_seed(seed)
        for step in range(steps):
            idx = torch.randint(len(embeddings), (batch_size,), generator=generator)
            loss = nn.functional.mse_loss(head(embeddings[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])
    head.eval()
    return losses
