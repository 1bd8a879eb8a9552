"""What the ShapesWorld checkers say of a data job's output: an evaluation step that the demo and
the tests run after a curate or synthesize job (the jobs themselves know nothing of ShapesWorld).

- `curation`: per ShapesWorld source, the share of planted mismatched captions (and of every
  planted defect in a modality the source keeps) that curation removed, and of clean pairs that
  it kept;
- `synthesis`: per modality the renderer filled, the share of generated values whose concept the
  checkers read back as the row's (the caption's for image and audio, the image's for captions).

    >>> curation("runs/demo/curated")
    {'shapes': {'clean_kept': 0.98, 'mismatched_removed': 0.95, ...}}
"""

import numpy as np
import pyarrow.compute as pc

from omniflow import storage as st
from omniflow.codecs.media import decode_audio, decode_image
from pipelines.manifest import read_upstream
from pipelines.parts import read_parts
from shapesworld.checkers import read_audio, read_caption, read_image
from shapesworld.defects import make_records


def _defect_modality(defect: str | None) -> str | None:
    """The media column a planted defect (`shapesworld.defects.DEFECTS`) is in: its name's end."""
    return defect.rsplit("_", 1)[1] if defect else None


def _share(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def curation(output: str, storage: st.StorageConfig | None = None) -> dict:
    """Per ShapesWorld source of the curate output in `output`: what curation kept of its clean
    pairs and removed of its planted defects (a sample is kept when it is in the curated parts)."""
    storage = storage or st.StorageConfig()
    manifest = read_upstream(output, storage, job="curate", field="output")
    curated = read_parts(manifest.outputs.curated, storage, columns=["source", "sample_id"])
    out = {}
    for spec in manifest.config["sources"]:
        src = spec["source"]
        if src.get("type") != "shapesworld":
            continue
        kept = set()
        if curated is not None:
            kept = set(curated.filter(pc.equal(curated.column("source"), src["name"])).column("sample_id").to_pylist())
        # a defect in a modality the source leaves out (a caption mismatch in an image-audio set) is
        # not in its data: such rows count as clean
        present = set(src.get("modalities") or ("image", "caption", "audio"))
        truth = {r["id"]: r["defect"] if _defect_modality(r["defect"]) in present else None
                 for r in make_records(src["samples"], seed=src["seed"], defect_rate=src["defect_rate"])}
        clean = [i in kept for i, d in truth.items() if d is None]
        mismatched = [i not in kept for i, d in truth.items() if d == "mismatched_caption"]
        defects = [i not in kept for i, d in truth.items() if d is not None]
        out[src["name"]] = {"clean_kept": _share(clean), "mismatched_removed": _share(mismatched),
                            "defects_removed": _share(defects), "clean": len(clean), "mismatched": len(mismatched)}
    return out


def synthesis(output: str, storage: st.StorageConfig | None = None) -> dict:
    """Per modality the ShapesWorld renderer filled in the synthesize output in `output`: how many
    values it generated and the share the checkers read back as the row's concept."""
    storage = storage or st.StorageConfig()
    manifest = read_upstream(output, storage, job="synthesize", field="output")
    config = manifest.config
    rendered = [m for m in config["fill"] if (config["generators"].get(m) or {}).get("type") == "shapesworld"]
    parts = manifest.outputs.triplets
    if not rendered or not parts:
        return {}
    table = read_parts(parts, storage, columns=["image", "caption", "audio", *(f"{m}_synthetic" for m in rendered)])
    out = {}
    for modality in rendered:
        rows = table.filter(table.column(f"{modality}_synthetic"))
        if not rows.num_rows:
            continue
        if modality == "caption":
            truth = read_image([np.asarray(decode_image(b)) for b in rows.column("image").to_pylist()]).concepts()
            read = read_caption(rows.column("caption").to_pylist()).concepts()
        else:
            truth = read_caption(rows.column("caption").to_pylist()).concepts()
            media = rows.column(modality).to_pylist()
            if modality == "image":
                read = read_image([np.asarray(decode_image(b)) for b in media]).concepts()
            else:
                read = read_audio([decode_audio(b)[0] for b in media]).concepts()
        agree = [r is not None and r == t for r, t in zip(read, truth)]
        out[modality] = {"generated": rows.num_rows, "agreement": _share(agree)}
    return out
