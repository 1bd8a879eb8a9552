"""Several reference captions per sample, for tasks that generate text.

Caption benchmarks hold several captions per medium (COCO's Karpathy test five per image,
AudioCaps' test five per clip), and their metrics (CIDEr above all) compare one generated caption
with all of them. Laid out as the project's sources lay them out, one row per (medium, caption),
rows whose conditioning medium is byte-identical are one sample: the model captions it once,
from the row whose key sorts first, and every row's caption is a reference. A row without the
medium or without a caption stays a row of its own (and is rejected with its reason).

    >>> groups = caption_groups(read_sources([source], storage), Modality.IMAGE,
    ...                         "out/karpathy/i2t/references.parquet", storage)
    >>> groups.references["coco/part-0/0"]  # the captions of every row with that image
    >>> groups.merged  # the other rows' keys: not generated
"""

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import ray.data

from omniflow import storage as st
from omniflow.modality import Modality
from pipelines.parts import read_parts
from pipelines.schema import EVAL_REFERENCE, MEDIA_COLUMN, READ_SAMPLE, REJECT_REASON, conform


@dataclass(frozen=True)
class CaptionGroups:
    references: dict[str, list[str]] = field(default_factory=dict)  # sample key -> captions, in key order
    merged: frozenset[str] = frozenset()  # rows captioned as part of another row's sample

    @classmethod
    def from_table(cls, table: pa.Table) -> "CaptionGroups":
        references: dict[str, list[str]] = defaultdict(list)
        merged = set()
        for key, sample, caption in zip(*(table.column(n).to_pylist() for n in EVAL_REFERENCE.names)):
            references[sample].append(caption)
            if key != sample:
                merged.add(key)
        return cls(dict(references), frozenset(merged))

    def of(self, key: str, caption: str | None) -> list[str]:
        """The references of sample `key`, whose own row holds `caption`."""
        return self.references.get(key) or [caption or ""]


def _digests(batch: pa.Table, *, column: str) -> pa.Table:
    """`READ_SAMPLE` rows -> (key, digest of the medium, caption) for rows with both."""
    batch = conform(batch, READ_SAMPLE)
    rows = zip(batch.column("key").to_pylist(), batch.column(column).to_pylist(),
               batch.column("caption").to_pylist(), batch.column(REJECT_REASON.name).to_pylist())
    kept = [(key, hashlib.sha256(medium).hexdigest(), caption) for key, medium, caption, reason in rows
            if medium and caption and caption.strip() and reason is None]
    return pa.table({n: pa.array([r[i] for r in kept], pa.string()) for i, n in enumerate(("key", "digest", "caption"))})


def group_table(rows: ray.data.Dataset, condition: Modality, *, num_cpus: float = 0.25) -> pa.Table:
    """The `EVAL_REFERENCE` rows of the groups of two or more rows in `rows` (`READ_SAMPLE`)."""
    rows = rows.map_batches(_digests, fn_kwargs={"column": MEDIA_COLUMN[condition]}, batch_format="pyarrow",
                            num_cpus=num_cpus)
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for block in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        for key, digest, caption in zip(*(block.column(n).to_pylist() for n in ("key", "digest", "caption"))):
            by_digest[digest].append((key, caption))
    out = []
    for members in by_digest.values():
        if len(members) > 1:
            members.sort()
            out += [(key, members[0][0], caption) for key, caption in members]
    out.sort(key=lambda r: (r[1], r[0]))
    return pa.table({n: pa.array([r[i] for r in out], pa.string()) for i, n in enumerate(EVAL_REFERENCE.names)},
                    schema=EVAL_REFERENCE)


def caption_groups(rows: ray.data.Dataset, condition: Modality, path: str, storage: st.StorageConfig, *,
                   num_cpus: float = 0.25) -> CaptionGroups:
    """The groups of `rows` by their `condition` medium, read from `path` (Parquet) when a run
    wrote them there, else found with one pass over `rows` and written there."""
    if st.exists(path, storage):
        return CaptionGroups.from_table(read_parts([path], storage))
    table = group_table(rows, condition, num_cpus=num_cpus)
    st.write_parquet_atomic(table, path, storage)
    return CaptionGroups.from_table(table)
