"""The evaluation job's `report.html`: one self-contained page (media inlined as base64).

Per benchmark: a table of every task's metrics, then per task its best and worst samples by the
task's per-sample score (inputs, the reference and what the model generated).
"""

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from omniflow.tasks import get_task
from pipelines.evaluation.generate import GENERATED_COLUMN
from pipelines.schema import MEDIA_COLUMN

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}img.px{image-rendering:pixelated;width:96px;height:96px}
.sample{display:inline-block;vertical-align:top;margin:0 1em 1em 0;max-width:240px;font-size:90%}
code{background:#f3f3f3;padding:1px 4px}"""

# The per-sample score that ranks a task's samples, by target: the first one present.
RANKING = ("clip_score", "clap_score", "cider", "checks_all")
COUNTS = ("samples", "rejected", "reference_samples")  # the table's first columns


def _media(column: str, value: Any) -> str:
    if value is None:
        return "<i>none</i>"
    if column.endswith("image"):
        return f'<img class="px" src="data:image/png;base64,{base64.b64encode(value).decode()}">'
    if column.endswith("audio"):
        return f'<audio controls src="data:audio/wav;base64,{base64.b64encode(value).decode()}"></audio>'
    return html.escape(str(value))


def _value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return html.escape(str(x))


def metrics_table(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per task, one column per metric any task has."""
    found = {k for r in tasks.values() for k, v in r.items() if isinstance(v, int | float)}
    names = [n for n in COUNTS if n in found] + sorted(found - set(COUNTS))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td class=l>{html.escape(task)}</td>"
        + "".join(f"<td>{_value(r[n]) if n in r else ''}</td>" for n in names) + "</tr>"
        for task, r in tasks.items())
    return f"<table><tr><th>task</th>{head}</tr>{rows}</table>"


def paper_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """This run's numbers in the paper's units beside OmniFlow's published ones."""
    head = "<tr><th>benchmark</th><th>task</th><th>metric</th><th>this run</th><th>OmniFlow (paper)</th><th>source</th></tr>"
    body = "".join(
        f"<tr><td class=l>{html.escape(r['benchmark'])} ({html.escape(r['paper_benchmark'])})</td>"
        f"<td class=l>{html.escape(r['task'])}</td><td class=l>{html.escape(r['metric'])}</td>"
        f"<td>{_value(r['this_run'])}</td><td>{_value(r['omniflow_paper'])}</td><td class=l>{html.escape(r['source'])}</td></tr>"
        for r in rows)
    return f"<table>{head}{body}</table>"


def _samples(rows: Sequence[Mapping[str, Any]], task: str, score: str) -> str:
    spec = get_task(task)
    (target,) = spec.targets
    shown = []
    for row in rows:
        parts = [f"<b>{html.escape(score)} {_value(row.get(score))}</b>"]
        parts += [f"{MEDIA_COLUMN[m]}: {_media(MEDIA_COLUMN[m], row.get(MEDIA_COLUMN[m]))}" for m in spec.conditions]
        parts.append(f"reference: {_media(MEDIA_COLUMN[target], row.get(MEDIA_COLUMN[target]))}")
        parts.append(f"generated: {_media(GENERATED_COLUMN[target], row.get(GENERATED_COLUMN[target]))}")
        shown.append('<div class="sample">' + "<br>".join(parts) + "</div>")
    return "".join(shown)


def write_report(metrics: Mapping[str, Any], samples: Mapping[tuple[str, str], Mapping[str, list]]) -> str:
    """The page: `metrics` as `metrics.json` holds them; `samples[(benchmark, task)]` the best and
    worst rows ("best", "worst": lists of dicts with media, generated output and scores)."""
    body = [f"<h1>Evaluation of <code>{html.escape(str(metrics['model']))}</code></h1>",
            f"<p>{html.escape(metrics['summary'])}</p>"]
    if metrics.get("beside_paper"):
        body.append("<h2>Beside the paper</h2>" + paper_table(metrics["beside_paper"]))
    for bench, tasks in metrics["benchmarks"].items():
        body.append(f"<h2>{html.escape(bench)}</h2>{metrics_table(tasks)}")
        for task in tasks:
            shown = samples.get((bench, task))
            if not shown or not shown["best"]:
                continue
            score = shown["score"]
            body.append(f"<h3>{html.escape(task)}: best by {html.escape(score)}</h3>"
                        + _samples(shown["best"], task, score))
            body.append(f"<h3>{html.escape(task)}: worst by {html.escape(score)}</h3>"
                        + _samples(shown["worst"], task, score))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>evaluation</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")
