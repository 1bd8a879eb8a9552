"""A PNG per score: its distribution per source, with each threshold that was applied marked."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def score_histogram(
    values_by_source: dict[str, np.ndarray], thresholds: dict[str, dict[str, float]], score: str
) -> bytes:
    """PNG bytes: one histogram per source of `score`, dashed lines at that source's thresholds."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for source, values in sorted(values_by_source.items()):
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=40, alpha=0.5, label=f"{source} (n={values.size})")
        for name, cut in thresholds.get(source, {}).items():
            if name.startswith(score.removesuffix("_score")) or name == f"min_{score}":
                ax.axvline(cut, linestyle="--", linewidth=1.2, color="black")
                ax.annotate(f"{source}: {name}", (cut, ax.get_ylim()[1] * 0.9), rotation=90, fontsize=7,
                            ha="right", va="top")
    ax.set_xlabel(score)
    ax.set_ylabel("samples")
    ax.set_title(f"{score} by source")
    if values_by_source:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
