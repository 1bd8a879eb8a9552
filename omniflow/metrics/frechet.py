"""The Fréchet distance between two sets of feature vectors (FID when the features are Inception's).

The evaluation job extracts features where the images are (Ray Data actors, on GPUs) and the
driver only accumulates them: `FrechetDistance` takes feature vectors, not images. A reference
set's statistics (count, sum, sum of outer products) are saved once beside a benchmark with the
name of the extractor that produced them, and every later run loads them instead of re-encoding
the reference images.

Why torchmetrics' `FrechetInceptionDistance` does the arithmetic: it keeps streaming float64 sums
that merge across batches, accepts any `nn.Module` as its feature extractor (here one that passes
precomputed features through) and computes the matrix square root itself. clean-fid works on
folders of files, resizes images its own way and downloads its weights itself; torch-fidelity
alone takes no custom feature module (nothing to put a toy domain's extractor in) and keeps no
streaming state. torch-fidelity still provides the network: `inception_features` builds its port
of TF's FID InceptionV3, as torchmetrics wraps it, from a local weights file.
"""

import io
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from omniflow import storage as st

STATISTICS_KEYS = ("count", "sum", "outer_sum")


class _Precomputed(nn.Module):
    """The "feature extractor" torchmetrics is given: the features are already extracted.

    torchmetrics reads the width from `num_features` and keeps the dtype of what `forward`
    returns for its result, so float64 in gives a float64 distance.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features_BD: torch.Tensor) -> torch.Tensor:
        return features_BD.to(torch.float64)


class FrechetDistance:
    """Streaming Fréchet distance between a real (reference) and a generated set of features.

    ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)), with means and unbiased covariances of
    everything `add`ed, accumulated on the CPU in float64.

    Example:
        >>> fd = FrechetDistance(num_features=2)
        >>> fd.add(np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), real=True)
        >>> fd.add(np.array([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]]), real=False)
        >>> round(fd.compute(), 6)   # same covariance, means 1 apart on each axis
        2.0
    """

    def __init__(self, num_features: int) -> None:
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        self.num_features = num_features
        # imported here: torchmetrics takes seconds to import, which every scoring actor would pay
        from torchmetrics.image.fid import FrechetInceptionDistance

        # Real statistics are replaced by `load_real_statistics`, so a cached compute() would lie.
        self._metric = FrechetInceptionDistance(
            feature=_Precomputed(num_features), compute_with_cache=False
        )

    def add(self, features_BD: torch.Tensor | np.ndarray, *, real: bool) -> None:
        """Accumulate a batch of feature vectors, (B, num_features), into one side."""
        features_BD = torch.as_tensor(features_BD).detach().to("cpu", torch.float64)
        if features_BD.ndim != 2 or features_BD.shape[1] != self.num_features:
            raise ValueError(
                f"features must have shape (batch, {self.num_features}), "
                f"got {tuple(features_BD.shape)}"
            )
        self._metric.update(features_BD, real=real)

    def num_samples(self, *, real: bool) -> int:
        """How many feature vectors one side holds."""
        side = "real" if real else "fake"
        return int(getattr(self._metric, f"{side}_features_num_samples"))

    def compute(self) -> float:
        """The distance between everything added so far (at least 2 samples on each side)."""
        for real, name in ((True, "real"), (False, "generated")):
            if (count := self.num_samples(real=real)) < 2:
                raise ValueError(
                    f"the Fréchet distance needs at least 2 {name} samples, got {count}"
                )
        return float(self._metric.compute())

    def real_statistics(self) -> dict[str, np.ndarray]:
        """What restores the real side: "count" (), "sum" (D,), "outer_sum" (D, D), in float64."""
        return {
            "count": np.asarray(self.num_samples(real=True), dtype=np.int64),
            "sum": self._metric.real_features_sum.numpy().copy(),
            "outer_sum": self._metric.real_features_cov_sum.numpy().copy(),
        }

    def load_real_statistics(self, statistics: Mapping[str, np.ndarray]) -> None:
        """Replace the real side with `real_statistics()` of an earlier run."""
        missing = [key for key in STATISTICS_KEYS if key not in statistics]
        if missing:
            raise ValueError(f"statistics lack {missing}; expected keys {list(STATISTICS_KEYS)}")
        d = self.num_features
        count = np.asarray(statistics["count"])
        sum_D = np.asarray(statistics["sum"], dtype=np.float64)
        outer_sum_DD = np.asarray(statistics["outer_sum"], dtype=np.float64)
        if count.shape != () or count < 0 or sum_D.shape != (d,) or outer_sum_DD.shape != (d, d):
            raise ValueError(
                f"statistics do not fit {d} features: count {count.shape}, sum {sum_D.shape}, "
                f"outer_sum {outer_sum_DD.shape}; expected (), ({d},), ({d}, {d})"
            )
        self._metric.real_features_num_samples.fill_(int(count))
        self._metric.real_features_sum.copy_(torch.from_numpy(sum_D))
        self._metric.real_features_cov_sum.copy_(torch.from_numpy(outer_sum_DD))


def save_statistics(
    path: str,
    statistics: Mapping[str, np.ndarray],
    *,
    extractor: str,
    storage: st.StorageConfig | None = None,
) -> None:
    """Write `FrechetDistance.real_statistics()` to an `.npz` at `path` (local or s3://, atomic).

    `extractor` names the features (network, weights, preprocessing), e.g.
    "inception-v3-tf-2015-12-05/pool3/tf-resize"; `load_statistics` refuses any other name.
    """
    buffer = io.BytesIO()
    np.savez(buffer, extractor=np.asarray(extractor), **{k: statistics[k] for k in STATISTICS_KEYS})
    st.write_bytes_atomic(path, buffer.getvalue(), storage or st.StorageConfig())


def load_statistics(
    path: str, *, extractor: str, storage: st.StorageConfig | None = None
) -> dict[str, np.ndarray]:
    """Statistics saved by `save_statistics`, checked to come from the same `extractor`."""
    with np.load(io.BytesIO(st.read_bytes(path, storage or st.StorageConfig()))) as npz:
        if "extractor" not in npz.files or any(key not in npz.files for key in STATISTICS_KEYS):
            raise ValueError(f"{path} is not a statistics file: it holds {npz.files}")
        saved = str(npz["extractor"])
        if saved != extractor:
            raise ValueError(
                f"{path} holds statistics of {saved!r} features, not {extractor!r}: "
                "recompute the reference statistics with this extractor"
            )
        return {key: npz[key] for key in STATISTICS_KEYS}


def inception_features(weights_path: str, *, antialias: bool = False) -> nn.Module:
    """FID's InceptionV3 (torch-fidelity's port of TF's network, as torchmetrics wraps it) loaded
    from a local weights file; nothing is downloaded.

    The module takes uint8 images (B, 3, H, W), resizes them to 299 x 299 and returns the (B, 2048)
    pool3 features, in float32. `weights_path` is torch-fidelity's converted TF state dict
    (`weights-inception-2015-12-05-6726825d.pth` from its releases). `antialias=False` resizes as
    TF did, so that distances compare with published FIDs; True is torchmetrics' default resize.
    Record the choice in the extractor name given to `save_statistics`.

    Example:
        >>> net = inception_features("weights-inception-2015-12-05-6726825d.pth")  # doctest: +SKIP
        >>> net(torch.zeros(4, 3, 64, 64, dtype=torch.uint8)).shape              # doctest: +SKIP
        torch.Size([4, 2048])
    """
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"no InceptionV3 weights file at {weights_path!r}: download torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth once and pass its local path"
        )
    # torch-fidelity unpickles the path it is given with weights_only=False; the file is read here
    # with weights_only=True and torch-fidelity gets bytes that hold nothing but these tensors.
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    tensors = io.BytesIO()
    torch.save(state_dict, tensors)
    tensors.seek(0)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=tensors,
            antialias=antialias,
        )
    except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
        reason = str(err).splitlines()[0]
        raise ValueError(f"{weights_path} is not an FID InceptionV3 state dict: {reason}") from err
