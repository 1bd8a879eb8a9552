"""The demo's `report.html`: one self-contained page (images, audio and plots inlined as base64).

Sections: quality per task, what the service generated per task (images, spectrograms with audio
players, captions), training loss curves per modality and per task for each stage, and curation
score histograms with the counts of every stage.
"""

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import soundfile

from jobs.train_logs import last_per_step, read_metrics
from omniflow.storage import StorageConfig, join
from pipelines.evaluation.report import metrics_table, paper_table

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}.task{display:inline-block;vertical-align:top;margin:0 1.5em 1.5em 0}
img.px{image-rendering:pixelated;width:96px;height:96px;margin-right:4px}.low{color:#b00;font-weight:bold}
code{background:#f3f3f3;padding:1px 4px}"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def spectrogram(wav: bytes) -> str:
    """A log-magnitude spectrogram of WAV bytes, as base64 PNG."""
    wave, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    fig, ax = plt.subplots(figsize=(3, 1.6), dpi=80)
    ax.specgram(wave, NFFT=512, Fs=rate, noverlap=384, cmap="magma")
    ax.set_ylim(0, 3000)
    ax.set_xlabel("s", fontsize=7)
    ax.set_ylabel("Hz", fontsize=7)
    ax.tick_params(labelsize=6)
    return _png(fig)


def loss_curves(run_dir: str, storage: StorageConfig, title: str) -> str | None:
    """Loss per modality and per task over steps, from a run's metrics.jsonl (local or s3://), as
    base64 PNG."""
    rows = last_per_step(read_metrics(run_dir, storage))
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3), dpi=80)
    for ax, prefix in zip(axes, ("loss/", "task/")):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), label=key.removeprefix(prefix), marker=".")
        ax.set_title(f"{title}: loss per {'modality' if prefix == 'loss/' else 'task'}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if keys:
            ax.legend(fontsize=7)
    return _png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x: float, goal: float = 0.9) -> str:
    return f'<span class="low">{x:.3f}</span>' if x < goal else f"{x:.3f}"


def write_report(out: Path, metrics: dict, manifests: dict) -> Path:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>OmniFlow demo on ShapesWorld</title>",
             f"<style>{STYLE}</style></head><body><h1>OmniFlow on ShapesWorld</h1>",
             (f"<p>Model <code>{html.escape(metrics['model_dir'])}</code>; the whole run took "
             f"{metrics['total_seconds']:.0f} s (stages reused: {', '.join(metrics['reused_stages']) or 'none'}).</p>")]

    quality = metrics["quality"]
    q = quality["config"]
    parts.append(f"<h2>Quality</h2><p>{q['samples']} held-out scenes per task, {q['steps']} steps, guidance "
                 f"{q['guidance']}: the share of outputs whose concept the ShapesWorld checkers read back "
                 f"(red: below the goal of {q['goal']}).</p>")
    goal = q["goal"]
    rows = [[t, _fmt(r["both"], goal), _fmt(r["colour"], goal), _fmt(r["shape"], goal), f"{r['unknown']:.3f}", r["seconds"]]
            for t, r in quality["tasks"].items()]
    parts.append(_table(["task", "both", "colour", "shape", "unreadable", "seconds"], rows))

    evaluation = metrics.get("evaluation")
    if evaluation:
        parts.append(f"<h2>Evaluation</h2><p><code>python -m jobs.evaluate</code> on held-out sets, with the toy CLIP "
                     f"and audio tower in the places of the paper's extractors (per-sample scores, the best and worst "
                     f"samples: <code>{html.escape(evaluation['output'])}/report.html</code>).</p>")
        for bench, tasks in evaluation["benchmarks"].items():
            parts.append(f"<h3>{html.escape(bench)}</h3>{metrics_table(tasks)}")
        if evaluation["beside_paper"]:
            parts.append("<h3>Beside the paper</h3><p>The layout of the paper's tables; the published numbers measure "
                         "OmniFlow on real benchmarks with real extractors, so only the layout carries over.</p>"
                         + paper_table(evaluation["beside_paper"]))

    served = metrics["serving"]
    parts.append(f"<h2>Generated over HTTP</h2><p>Inputs: caption “{html.escape(served['inputs']['caption'])}”, "
                 f"concept <b>{html.escape(served['inputs']['concept'])}</b>, this image "
                 f"<img class='px' src='data:image/png;base64,"
                 f"{base64.b64encode((out / 'samples' / 'input.png').read_bytes()).decode()}'> and this clip "
                 f"<audio controls src='data:audio/wav;base64,"
                 f"{base64.b64encode((out / 'samples' / 'input.wav').read_bytes()).decode()}'></audio>.</p>")
    for task, answer in served["tasks"].items():
        cells = []
        for name in answer["files"]:
            data = (out / name).read_bytes()
            if name.endswith(".png"):
                cells.append(f"<img class='px' src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
            elif name.endswith(".wav"):
                cells.append(f"<div><img src='data:image/png;base64,{spectrogram(data)}'><br>"
                             f"<audio controls src='data:audio/wav;base64,{base64.b64encode(data).decode()}'></audio></div>")
        cells += [f"<div>“{html.escape(t)}”</div>" for t in answer.get("text") or []]
        parts.append(f"<div class='task'><h3>{task}</h3>{''.join(cells)}"
                     f"<small>{answer['timings']['total_s']:.2f} s</small></div>")

    parts.append("<h2>Training</h2>")
    for stage in ("stage1", "stage2", "stage3"):
        manifest = manifests[stage]
        config = manifest["config"]
        curve = loss_curves(join(config["storage_path"], config["name"]), StorageConfig(**config["storage"]), stage)
        final = metrics["training"][stage]
        parts.append(f"<h3>{stage}</h3><p>final loss {final.get('loss', float('nan')):.4f}, validation "
                     f"{final.get('val/loss', float('nan')):.4f}, {final.get('samples_per_s', 0):.0f} samples/s</p>")
        if curve:
            parts.append(f"<img src='data:image/png;base64,{curve}'>")

    parts.append("<h2>Curation</h2>")
    rows = [[s, c["input"], c["kept"], c.get("filtered", 0), c.get("rejected", 0),
             html.escape(", ".join(f"{k} {v}" for k, v in c.get("by_stage", {}).items()))]
            for s, c in metrics["curation"].items()]
    parts.append(_table(["source", "input", "kept", "filtered", "rejected", "why"], rows))
    curate = manifests["curate"]
    for path in (curate.get("plots") or curate["outputs"].get("plots") or {}).values():
        if Path(path).is_file():
            parts.append(f"<img src='data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}'>")
    rows = [[s, c["input"], c["kept"], c.get("rejected", 0), json.dumps(c.get("generated", {}))]
            for s, c in metrics["synthesis"].items()]
    parts.append("<h3>Synthesis</h3>" + _table(["source", "input", "kept", "rejected", "generated"], rows))
    rows = [[s, c["input"], c["encoded"], c.get("rejected", 0)] for s, c in metrics["encoding"].items()]
    parts.append("<h3>Encoding</h3>" + _table(["source", "input", "encoded", "rejected"], rows))
    timings = metrics["stage_seconds"]
    parts.append("<h2>Time per stage</h2>" + _table(list(timings), [[f"{v:.0f} s" for v in timings.values()]]))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


