"""Eyeball ShapesWorld: `python -m shapesworld preview --out DIR -n 16 [--seed 0]`.

Writes `grid.png` (the images, enlarged, row-major), one WAV per sample and `captions.txt` (one
line per sample: index, concept, size, position, caption), plus what the checkers read back.
"""

import argparse
import math
from pathlib import Path

import numpy as np

from omniflow.codecs.media import encode_audio, encode_image
from shapesworld.checkers import read_audio, read_caption, read_image
from shapesworld.concepts import sample_concepts, sample_scenes
from shapesworld.render import (
    SAMPLE_RATE,
    render_audio,
    render_captions,
    render_images,
)


def image_grid(images_NHWC: np.ndarray, *, scale: int = 4, gap: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one mid-grey sheet, images enlarged `scale` times, near-square grid."""
    n, h, w, _ = images_NHWC.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    sheet = np.full((rows * cell_h + gap, cols * cell_w + gap, 3), 128, np.uint8)
    big = images_NHWC.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        top, left = gap + (i // cols) * cell_h, gap + (i % cols) * cell_w
        sheet[top : top + h * scale, left : left + w * scale] = big[i]
    return sheet


def preview(out: Path, *, n: int, seed: int, scale: int) -> None:
    scenes = sample_scenes(sample_concepts(n, seed=seed), seed=seed)
    images, captions, waves = render_images(scenes), render_captions(scenes), render_audio(scenes)
    readings = [
        r.concepts() for r in (read_image(images), read_caption(captions), read_audio(waves))
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.png").write_bytes(encode_image(image_grid(images, scale=scale)))
    lines = []
    for i, scene in enumerate(scenes):
        name = f"{i:03d}_{scene.concept.colour}_{scene.concept.shape}"
        (out / f"{name}.wav").write_bytes(encode_audio(waves[i], SAMPLE_RATE))
        read = " / ".join(str(r[i]) for r in readings)
        lines.append(f"{i:3d}  {scene.concept}  {scene.size}  {scene.position}  {captions[i]!r}"
                     f"  [read: {read}]")
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {n} samples to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapesworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preview", help="write an image grid, WAVs and captions to look at")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="image enlargement in the grid")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be >= 1, got {args.n}")
    preview(args.out, n=args.n, seed=args.seed, scale=args.scale)


if __name__ == "__main__":
    main()
