"""Ray Data stages that turn curated or synthesized rows into latent rows.

Two stages, so that each scales on its own:

- `LatentPreprocess` (CPU actors): decodes the media bytes into the codecs' fixed-shape inputs,
  `image_pixels` (3, R, R) in [0, 1] at the image codec's resolution and `audio_wave` (samples,)
  fitted to the audio codec's clip, with the same functions each codec's own `preprocess` uses.
  Media that fail to decode reject their row (stage "decode") with the reason.
- `LatentEncoder` (GPU actors, or CPU): loads the codecs and pooled encoders once per actor and
  encodes each modality on the rows that have it. A row whose encode fails, or gives non-finite
  latents, is rejected (stage "encode"); a failed batch is retried row by row so that one bad row
  does not take its batch down.

`latent_sink` then commits each write task's rows whole: encoded rows as `latents/part-*.parquet`
(`schema.latent_sample_schema`), rejected ones as `rejects/part-*.parquet` (`schema.DROPPED_SAMPLE`).

    config = EncodingConfig(codecs={"image": {"kind": "image-vae", "path": "vae", "resolution": 256}},
                            encoder={"num_gpus": 1, "concurrency": 4, "batch_size": 256}, dtype="bfloat16")
    ds = read_encode_inputs(index_parts(parts, storage).reads(), storage)
    ds = ds.map_batches(LatentPreprocess, **LatentPreprocess.map_batches_kwargs(config))
    ds = ds.map_batches(LatentEncoder, **LatentEncoder.map_batches_kwargs(config))
    ds.write_datasink(latent_sink("s3://bucket/latents", config, storage, rows_per_part=1024))
"""

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from omniflow import storage as st
from omniflow.codecs.base import codec_config_for
from omniflow.config import config_hash
from omniflow.modality import MODALITIES, Modality
from pipelines.parts import KeptRejectedSink, read_parts_dataset
from pipelines.resources import StageResources, resolve_device
from pipelines.rows import rejects, set_column, tensor_rows, with_rejects
from pipelines.schema import (
    LATENT_MODALITIES,
    LATENT_STORAGE,
    MEDIA_COLUMN,
    MEDIA_COLUMNS,
    SCHEMA_VERSION,
    SYNTHETIC_FLAG,
    TRIPLET_SAMPLE,
    latent_column,
    latent_sample_schema,
    pooled_column,
    tensor_column,
)

if TYPE_CHECKING:
    import torch

# Model code (torch, diffusers, transformers) is imported where a stage needs it, so that read and
# write tasks, which import this module too, start quickly.

logger = logging.getLogger(__name__)

DECODE_STAGE, ENCODE_STAGE = "decode", "encode"
SYNTHETIC_FLAGS = tuple(SYNTHETIC_FLAG.values())
# Input columns read from curated / triplet parts; the synthetic flags are false when absent.
INPUT_COLUMNS = ("key", "source", "sample_id", *MEDIA_COLUMNS, "source_weight", *SYNTHETIC_FLAGS)
# Model inputs passed from LatentPreprocess to LatentEncoder, which drops them.
IMAGE_PIXELS, AUDIO_WAVE = "image_pixels", "audio_wave"
INPUT_SAMPLE = pa.schema([TRIPLET_SAMPLE.field(name) for name in INPUT_COLUMNS])


class EncodingConfig(BaseModel):
    """The codecs (one per modality; a modality without one is left out), the optional pooled
    encoders, the storage dtype of the latents, and both stages' resources.

    Codec dicts are what `omniflow.codecs.build_codec` takes; their `device` is set per actor
    from `encoder.device`.
    """

    model_config = ConfigDict(extra="forbid")
    codecs: dict[Modality, dict[str, Any]] = Field(default_factory=dict)
    pooled: dict[Modality, dict[str, Any]] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_image_aspect: float = Field(
        10.0, ge=1, description="longest / shortest image side; beyond it the resize would blow up memory"
    )
    decode: StageResources = Field(default_factory=lambda: StageResources(device="cpu"))
    encoder: StageResources = Field(default_factory=StageResources)

    @model_validator(mode="after")
    def _check(self) -> "EncodingConfig":
        if not self.codecs:
            raise ValueError("codecs: configure at least one of image, text, audio (or name a codec set in codec_sets)")
        if self.decode.num_gpus > 0:
            raise ValueError("decode.num_gpus must be 0: decoding runs on CPU actors")
        for modality, raw in self.codecs.items():
            codec_config_for(modality, raw)
        for modality, raw in self.pooled.items():
            codec_config_for(modality, raw, pooled=True)
            if modality not in self.codecs:
                raise ValueError(f"pooled.{modality.value} needs codecs.{modality.value}: it reads the same model inputs")
        return self

    @property
    def modalities(self) -> list[Modality]:
        return [m for m in MODALITIES if m in self.codecs]

    def codec_hash(self) -> str:
        """Hash of the codec and pooled configs: latents from different codecs never mix."""
        raw = {"codecs": {m.value: c for m, c in self.codecs.items()}, "pooled": {m.value: c for m, c in self.pooled.items()}}
        return config_hash(raw)

    def codec_config(self, modality: Modality) -> Any:
        """The validated config of `modality`'s codec (None when it has none)."""
        raw = self.codecs.get(modality)
        return codec_config_for(modality, raw) if raw else None


# ---- codecs ----------------------------------------------------------------------------------


def load_encoders(config: EncodingConfig, device: "torch.device") -> tuple[dict[Modality, Any], dict[Modality, Any]]:
    """(codecs, pooled encoders) built on `device`."""
    from omniflow.codecs import build_codec

    def build(raw: dict) -> Any:
        return build_codec({**raw, "device": str(device)})

    return {m: build(c) for m, c in config.codecs.items()}, {m: build(c) for m, c in config.pooled.items()}


# ---- reading ---------------------------------------------------------------------------------


def read_encode_inputs(
    reads: Sequence[dict[str, Any]],
    storage: st.StorageConfig,
    *,
    rows_per_block: int = 256,
    num_cpus: float = 0.5,
) -> "ray.data.Dataset":
    """The rows of curated / triplet parts that `reads` (`parts.PartIndex.reads`) name, one read
    task per part, as `INPUT_COLUMNS`; curated parts get false synthetic flags. Blocks hold at most
    `rows_per_block` rows so that media bytes never sit in memory a whole part at a time."""
    return read_parts_dataset(reads, storage, schema=INPUT_SAMPLE, columns=INPUT_COLUMNS, prepare=_with_flags,
                              rows_per_block=rows_per_block, num_cpus=num_cpus)


def _with_flags(table: pa.Table) -> pa.Table:
    """Curated rows (no synthetic flags) as input rows: nothing in them is synthetic."""
    for flag in SYNTHETIC_FLAGS:
        if flag not in table.column_names:
            table = table.append_column(flag, pa.array(np.zeros(table.num_rows, bool)))
    return table


# ---- batch helpers ---------------------------------------------------------------------------


def to_storage(values: "torch.Tensor", dtype: str) -> np.ndarray:
    """Latents -> numpy in the storage dtype; bfloat16 as its raw bits in uint16."""
    import torch

    values = values.detach().cpu().contiguous()
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.to(getattr(torch, dtype)).numpy()


# ---- CPU stage -------------------------------------------------------------------------------


class LatentPreprocess:
    """CPU stage: media bytes -> the codecs' fixed-shape inputs, plus the presence mask.

    Adds `has_image` / `has_text` / `has_audio` (media present and a codec configured),
    `image_pixels` (3, R, R) float32 and `audio_wave` (samples,) float32 (zeros where absent),
    and the reject columns; drops the media bytes. Needs the codec configs, not their weights.
    """

    def __init__(self, config: dict):
        self.config = EncodingConfig.model_validate(config)
        self.image = self.config.codec_config(Modality.IMAGE)
        self.audio = self.config.codec_config(Modality.AUDIO)
        self.inputs = []  # (modality, column, decode, per-row shape)
        if self.image is not None:
            r = self.image.resolution
            self.inputs.append((Modality.IMAGE, IMAGE_PIXELS, self._pixels, (3, r, r)))
        if self.audio is not None:
            self.inputs.append((Modality.AUDIO, AUDIO_WAVE, self._wave, (self.audio.mel.num_samples,)))

    @classmethod
    def map_batches_kwargs(cls, config: EncodingConfig) -> dict[str, Any]:
        return config.decode.map_batches_kwargs({"config": config.model_dump(mode="json")})

    def _pixels(self, data: bytes) -> np.ndarray:
        from omniflow.codecs.image import to_pixels
        from omniflow.codecs.media import MediaError, decode_image

        image = decode_image(data)
        short, long = sorted(image.size)
        if long > self.config.max_image_aspect * short:
            raise MediaError(
                f"image is {image.size[0]}x{image.size[1]}, more elongated than max_image_aspect "
                f"{self.config.max_image_aspect:g}"
            )
        return to_pixels([image], self.image.resolution, resize=self.image.resize)[0].numpy()

    def _wave(self, data: bytes) -> np.ndarray:
        from omniflow.codecs.audio import prepare_waveform

        return prepare_waveform(data, self.audio.mel, peak=self.audio.peak)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from omniflow.codecs.media import MediaError

        n = batch.num_rows
        if n == 0 and "key" not in batch.column_names:  # Ray may pass an empty block without columns
            batch = INPUT_SAMPLE.empty_table()
        stage, reason = rejects(batch)
        out = batch
        for modality in MODALITIES:
            present = batch.column(MEDIA_COLUMN[modality]).is_valid().to_numpy(zero_copy_only=False)
            out = set_column(out, f"has_{modality.value}", pa.array(present & (modality in self.config.codecs)))
        for modality, column, decode, shape in self.inputs:
            inputs = np.zeros((n, *shape), np.float32)
            for i, data in enumerate(batch.column(MEDIA_COLUMN[modality]).to_pylist()):
                if data is None or reason[i] is not None:
                    continue
                try:
                    inputs[i] = decode(data)
                except MediaError as err:
                    stage[i], reason[i] = DECODE_STAGE, f"{modality.value}: {err}"
            out = set_column(out, column, tensor_column(column, inputs, pa.float32()))
        out = out.drop_columns([c for c in ("image", "audio") if c in out.column_names])
        return with_rejects(out, stage, reason)


# ---- encoder actor ---------------------------------------------------------------------------


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def encode_rows(encode: Callable[[Any], "torch.Tensor"], items: "Sequence[Any] | torch.Tensor") -> list:
    """Each item's encoding (a tensor) or why it failed (a string).

    The batch is encoded at once; if that raises, each item alone, so that one bad item rejects
    only itself. Non-finite outputs are failures.

        >>> import torch
        >>> encode_rows(lambda x: torch.log(x), torch.tensor([[1.0], [-1.0]]))
        [tensor([0.]), 'non-finite values in the output']
    """
    import torch

    def one(k: int) -> "torch.Tensor | str":
        try:
            return encode(items[k:k + 1])[0]
        except Exception as err:  # noqa: BLE001 - any failure of one row becomes its reject reason
            return _describe(err)

    try:
        out = encode(items)
        # one check for the whole batch: on a GPU, a check per row would wait on the device per row
        finite = torch.isfinite(out.reshape(len(out), -1).float()).all(dim=1).tolist()
        encoded = list(out)
    except Exception as err:  # noqa: BLE001 - retried row by row to find the culprit
        encoded = [one(k) for k in range(len(items))] if len(items) > 1 else [_describe(err)]
        finite = [isinstance(e, str) or bool(torch.isfinite(e.float()).all()) for e in encoded]
    return [e if ok else "non-finite values in the output" for e, ok in zip(encoded, finite)]


class LatentEncoder:
    """Actor stage: codec latents and pooled vectors for every present modality.

    Loads the codecs once per actor on `encoder.device`. Output: the latent schema's columns plus
    the reject columns; every configured modality has its tensor column, null where the row lacks
    the modality. The model inputs are dropped.
    """

    def __init__(self, config: dict):
        self.config = EncodingConfig.model_validate(config)
        self.device = resolve_device(self.config.encoder.device)
        self.codecs, self.pooled = load_encoders(self.config, self.device)
        self.value_type = LATENT_STORAGE[self.config.dtype]
        self.np_dtype = np.dtype(self.value_type.to_pandas_dtype())
        logger.info("LatentEncoder: %s on %s", [m.value for m in self.codecs], self.device)

    @classmethod
    def map_batches_kwargs(cls, config: EncodingConfig) -> dict[str, Any]:
        return config.encoder.map_batches_kwargs({"config": config.model_dump(mode="json")})

    def _inputs(self, modality: Modality, batch: pa.Table, rows: np.ndarray) -> "list[str] | torch.Tensor":
        """What the modality's codec `encode` takes, for `rows`: captions, pixels or waveforms."""
        import torch

        if modality == Modality.TEXT:
            captions = batch.column("caption").to_pylist()
            return [captions[i] for i in rows]
        column = IMAGE_PIXELS if modality == Modality.IMAGE else AUDIO_WAVE
        return torch.from_numpy(tensor_rows(batch, column)[rows])

    def _pooled(self, modality: Modality, inputs: "list[str] | torch.Tensor") -> list:
        from omniflow.codecs.pooled import pooled_inputs

        rate = self.codecs[Modality.AUDIO].sample_rate if modality == Modality.AUDIO else None
        return pooled_inputs(modality, inputs, rate)

    def _column(self, name: str, shape: tuple[int, ...], n: int, rows: np.ndarray, results: list,
                stage: list, reason: list) -> tuple[np.ndarray, np.ndarray]:
        """(values (n, *shape) in the storage dtype, valid (n,)); failures set the rows' rejects."""
        import torch

        values, valid = np.zeros((n, *shape), self.np_dtype), np.zeros(n, bool)
        done = [(i, r) for i, r in zip(rows, results) if not isinstance(r, str)]
        for i, result in zip(rows, results):
            if isinstance(result, str) and reason[i] is None:
                stage[i], reason[i] = ENCODE_STAGE, f"{name}: {result}"
        if done:
            index = np.array([i for i, _ in done])
            values[index] = to_storage(torch.stack([r for _, r in done]), self.config.dtype)
            valid[index] = True
        return values, valid

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        with torch.inference_mode():
            return self._encode(batch)

    def _encode(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        stage, reason = rejects(batch)
        alive = np.array([r is None for r in reason], bool)
        columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for modality, codec in self.codecs.items():
            has = batch.column(f"has_{modality.value}").to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
            rows = np.flatnonzero(alive & has)
            inputs = self._inputs(modality, batch, rows) if len(rows) else None
            results = encode_rows(codec.encode, inputs) if len(rows) else []
            name = latent_column(modality.value)
            columns[name] = self._column(name, tuple(codec.latent_shape), n, rows, results, stage, reason)
            if modality in self.pooled:
                pooled = self.pooled[modality]
                results = encode_rows(pooled.embed, self._pooled(modality, inputs)) if len(rows) else []
                name = pooled_column(modality.value)
                columns[name] = self._column(name, (int(pooled.config.pooled_dim),), n, rows, results, stage, reason)
        rejected = np.array([r is not None for r in reason], bool)
        out = batch.drop_columns([c for c in (IMAGE_PIXELS, AUDIO_WAVE) if c in batch.column_names])
        for name, (values, valid) in columns.items():
            out = set_column(out, name, tensor_column(name, values, self.value_type, valid & ~rejected))
        out = set_column(out, "schema_version", pa.array(np.full(n, SCHEMA_VERSION, np.int16)))
        return with_rejects(out, stage, reason)


# ---- writing ---------------------------------------------------------------------------------


def output_schema(table: pa.Table, config: EncodingConfig) -> pa.Schema:
    """The latent schema for the encoder's output `table`: shapes as its tensor columns have them."""
    def shape(name: str) -> tuple[int, ...] | None:
        return tuple(table.schema.field(name).type.shape) if name in table.column_names else None

    latents = {m: shape(latent_column(m)) for m in LATENT_MODALITIES if shape(latent_column(m))}
    pooled = {m: shape(pooled_column(m))[0] for m in LATENT_MODALITIES if shape(pooled_column(m))}
    return latent_sample_schema(latent_shapes=latents, pooled_dims=pooled, dtype=config.dtype, codec_hash=config.codec_hash())


def latent_sink(output: str, config: EncodingConfig, storage: st.StorageConfig, *, rows_per_part: int) -> KeptRejectedSink:
    """The encode job's output: encoded rows as `output/latents/` parts of about `rows_per_part`
    rows (`schema.latent_sample_schema`, shapes as the encoder's tensor columns have them),
    rejected ones under `output/rejects/`."""
    return KeptRejectedSink(output, "latents", functools.partial(output_schema, config=config), storage,
                            rows_per_part=rows_per_part)
