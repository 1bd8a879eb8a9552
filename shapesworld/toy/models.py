"""All the toy models at once: the toy CLIP (with its aesthetic head and audio tower) and the three
toy codecs, as `runs/toy/` lays them out (`clip/`, `codecs/`).

    >>> clip, codecs = build_toy_models("runs/toy", workers=2)
"""

from pathlib import Path

from shapesworld.toy.cache import is_built
from shapesworld.toy.clip import MANIFEST as CLIP_MANIFEST
from shapesworld.toy.clip import ToyClipConfig, build_toy_clip
from shapesworld.toy.codecs import MANIFEST as CODECS_MANIFEST
from shapesworld.toy.codecs import ToyCodecsConfig, build_toy_codecs
from shapesworld.toy.pool import build_pool


def build_toy_models(toy: str | Path, workers: int) -> tuple[dict, dict]:
    """Build the toy CLIP into `toy/clip` and the toy codecs into `toy/codecs`, or reuse them when
    built; returns their manifests (clip, codecs).

    With `workers` > 1 the four models train side by side in that many single-threaded processes
    (at most four: one per model), which on a few cores beats one model after another on all of
    them (`shapesworld.toy.pool`).
    """
    clip, codecs = Path(toy) / "clip", Path(toy) / "codecs"
    built = is_built(clip, CLIP_MANIFEST, ToyClipConfig().digest()) and is_built(
        codecs, CODECS_MANIFEST, ToyCodecsConfig().digest())
    if built or workers <= 1:
        return build_toy_clip(clip), build_toy_codecs(codecs)
    with build_pool(min(4, workers)) as pool:
        clip_done = pool.submit(build_toy_clip, clip)
        codecs_manifest = build_toy_codecs(codecs, pool=pool)
        return clip_done.result(), codecs_manifest
