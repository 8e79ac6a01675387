"""The run report: OUTPUT_DIR/report.html and its images in OUTPUT_DIR/report/, drawn from what the run folder holds
(training.report), written while the run goes (at each validation and checkpoint and at the end) and by
`dreambooth report`.

One page, read offline: no script, no network; every image is a file beside it (curves, thumbnails, the cells of
the sample grids) or one the run already wrote (samples/). Every file goes through formats.atomic, the page last,
so a browser never reads half of one. Every string from the run (prompts, file names, reasons) is escaped.
Torch-free; matplotlib is imported only when curves are drawn, with its Agg backend (no display needed).
"""

from __future__ import annotations

import html
import os
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from dreambooth.formats.atomic import atomic_file, write_text_atomic
from dreambooth.training.report import (
    LOSS_KEYS,
    REPORT_DIR,
    REPORT_PAGE,
    RunFacts,
    SampleImage,
    class_images,
    ema,
    gather,
    prompt_rows,
    read_json,
    record_progress,
    steps_per_second,
    wall_time,
)
from dreambooth.training.rundir import RUN_INFO, human_size

THUMB_PX = 128
CLASS_STRIP = 12  # class images shown
LOSS_LABELS = {"loss": "total loss", "instance_loss": "instance loss", "prior_loss": "prior loss"}
MEASURE_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "world_subject": "world: subject",
                  "world_background": "world: background", "world_colour": "world: class colour"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def src(out: Path, path: Path) -> str:
    """An image's address relative to the page, escaped for an attribute."""
    return esc(quote(path.relative_to(out).as_posix()))


def _stale(target: Path, source: Path) -> bool:
    try:
        return not target.is_file() or target.stat().st_mtime < source.stat().st_mtime
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------- images


def source_key(source: Path) -> str:
    """A thumbnail's name from what it shows (the photo's path, size and modification time), so that a resumed run
    whose photos changed gets new thumbnails rather than the old ones under the same position."""
    import hashlib

    try:
        stat = source.stat()
        stamp = f"{stat.st_mtime_ns}|{stat.st_size}"
    except OSError:
        stamp = "missing"
    return hashlib.sha256(f"{source.resolve()}|{stamp}".encode()).hexdigest()[:20]


def thumbnail(source: Path, target: Path, box: tuple[int, int, int, int] | None = None, px: int = THUMB_PX) -> bool:
    """A PNG thumbnail (or a cell of a grid, unscaled but for `px`); False if the source cannot be read."""
    from PIL import Image

    if not _stale(target, source):
        return True
    try:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    except OSError:
        return False
    if box is not None:
        image = image.crop(box)
    if max(image.size) > px:
        image.thumbnail((px, px))
    with atomic_file(target) as tmp:
        image.save(tmp, format="PNG")
    return True


def _new_figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, whatever the environment says
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100, layout="constrained")


def _save_figure(figure, target: Path) -> None:
    with atomic_file(target) as tmp:
        figure.savefig(tmp, format="png")


def draw_curves(facts: RunFacts, target: Path) -> bool:
    """Losses (raw faint, EMA-smoothed solid) and the learning rate against step, as one PNG."""
    if not facts.log:
        return False
    steps = [r["step"] for r in facts.log]
    keys = [k for k in LOSS_KEYS if any(isinstance(r.get(k), (int, float)) for r in facts.log)]
    if "prior_loss" in keys and not (facts.info or {}).get("prior_preservation") and \
            not any(r.get("prior_loss") for r in facts.log):
        keys.remove("prior_loss")  # always 0 without prior preservation
    if "prior_loss" not in keys and all(r.get("instance_loss") == r.get("loss") for r in facts.log):
        keys = [k for k in keys if k != "instance_loss"]  # the total, drawn once
    figure = _new_figure((10, 3.4))
    losses, rate = figure.subplots(1, 2, width_ratios=(2, 1))
    for i, key in enumerate(keys):
        xs = [r["step"] for r in facts.log if isinstance(r.get(key), (int, float))]
        ys = [float(r[key]) for r in facts.log if isinstance(r.get(key), (int, float))]
        colour = f"C{i}"
        losses.plot(xs, ys, color=colour, alpha=0.25, linewidth=1)
        losses.plot(xs, ema(ys), color=colour, linewidth=1.8, label=f"{LOSS_LABELS[key]} (EMA 0.9)")
    for key, label, colour in (("val_loss", "validation loss (fixed draws)", "C4"),
                               ("val_prior_loss", "validation prior loss", "C5")):
        points = [(r["step"], float(r[key])) for r in facts.val_log if isinstance(r.get(key), (int, float))]
        if points and (key == "val_loss" or any(r.get("val_prior_loss") for r in facts.val_log)):
            losses.plot(*zip(*points), color=colour, linewidth=1.8, marker="o", markersize=3, label=label)
    losses.set(xlabel="step", ylabel="loss", title="loss (faint: as logged)")
    losses.legend(fontsize=8)
    losses.grid(alpha=0.3)
    rate.plot(steps, [r.get("lr") for r in facts.log], color="C3")
    rate.set(xlabel="step", ylabel="learning rate", title="learning rate")
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    rate.grid(alpha=0.3)
    _save_figure(figure, target)
    return True


def measured_keys(facts: RunFacts) -> list[str]:
    rows = [c.metrics for c in facts.checkpoints if c.metrics]
    return [k for k in MEASURE_LABELS if any(isinstance(m.get(k), (int, float)) for m in rows)]


def draw_measures(facts: RunFacts, target: Path) -> bool:
    """Each measure of `evaluate --checkpoints all` against the checkpoint's step."""
    rows = [c for c in facts.checkpoints if c.metrics and c.step is not None]
    keys = measured_keys(facts)
    if not rows or not keys:
        return False
    figure = _new_figure((6, 3.2))
    axes = figure.subplots()
    for key in keys:
        points = [(c.step, c.metrics[key]) for c in rows if isinstance(c.metrics.get(key), (int, float))]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=MEASURE_LABELS[key])
    best = next((c for c in rows if c.best), None)
    if best is not None:
        axes.axvline(best.step, color="grey", linestyle="--", linewidth=1, label=f"best: {best.name}")
    axes.set(xlabel="step", ylabel="score", title="checkpoints")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save_figure(figure, target)
    return True


def sample_file(facts: RunFacts, image: SampleImage) -> Path | None:
    """The file the page shows for a validation image: its cell cut from the grid, or the grid itself."""
    if image.box is None:
        return image.grid
    target = facts.out / REPORT_DIR / "samples" / f"{image.grid.stem}-{image.index:02d}.png"
    return target if thumbnail(image.grid, target, image.box, px=256) else None


# ---------------------------------------------------------------------------------------------- the page


def _size(n: int | None) -> str:
    return "-" if n is None else human_size(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _table(rows: list[tuple[str, str]]) -> str:
    """Label/value rows; values are HTML already (escaped by the caller)."""
    return "<table class=facts>" + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def run_section(facts: RunFacts) -> str:
    info = facts.info or {}
    sessions = (facts.progress or {}).get("sessions") or []
    last = sessions[-1] if sessions else {}
    rows = [("status", esc(facts.status)),
            ("run id", esc(info.get("run_id", "not recorded"))),
            ("base model", esc(info.get("base_model", "not recorded"))
             + (f" <span class=dim>hash {esc(info['base_model_hash'])}</span>" if info.get("base_model_hash") else "")),
            ("method", esc(info.get("method", "not recorded"))
             + (", with prior preservation" if info.get("prior_preservation") else
                ", without prior preservation" if "prior_preservation" in info else "")),
            ("optimizer", esc(info.get("optimizer", "not recorded")))]
    if info.get("weights"):  # recorded since --use_ema: the EMA weights, or the last step's
        rows.append(("weights", esc(info["weights"])))
    for i, s in enumerate(facts.subjects):
        tokens = " ".join(f"<code>{esc(t)}</code>" for t in s.get("identifier_tokens") or [])
        who = f"subject {i + 1}: " if len(facts.subjects) > 1 else ""
        rows += [(f"{who}identifier", f"<code>{esc(s.get('identifier'))}</code> ({esc(s.get('identifier_kind'))})"
                  + (f", tokenized as {tokens}" if tokens else "")
                  + (f", initialized from <code>{esc(s['initializer'])}</code>" if s.get("initializer") else "")),
                 (f"{who}class word", esc(s.get("class_word") or "-")),
                 (f"{who}prompts", esc(s.get("instance_prompt") or "-")
                  + (f" / {esc(s['class_prompt'])}" if s.get("class_prompt") else ""))]
    speed = steps_per_second(facts.log)
    memory = last.get("peak_memory")
    rows += [("device", esc(last.get("device", "not recorded"))),
             ("wall time", esc(_duration(wall_time(facts.progress)))
              + (f" <span class=dim>over {len(sessions)} sessions</span>" if len(sessions) > 1 else "")),
             ("speed", esc(f"{speed:.2f} steps/s" if speed else "not logged")),
             ("peak memory", esc(f"{_size(memory)} ({last.get('memory_kind')})" if memory else "not recorded")),
             ("started", esc(info.get("started", "not recorded")))]
    versions = info.get("versions") or {}
    rows.append(("versions", esc(", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded")))
    config = (f"<details><summary>resolved config (config.yaml)</summary><pre>{esc(facts.config_text)}</pre>"
              "</details>" if facts.config_text else "<p class=absent>No config.yaml in the run folder.</p>")
    return f"<section id=run><h2>The run</h2>{_table(rows)}{config}</section>"


def _figure(facts: RunFacts, image: Path, caption: str, alt: str) -> str:
    return (f"<figure><img src=\"{src(facts.out, image)}\" alt=\"{esc(alt)}\" loading=lazy>"
            f"<figcaption>{caption}</figcaption></figure>")


def preflight_section(facts: RunFacts) -> str:
    """The instance photos used, the files set aside and why, the warnings, a strip of class images."""
    parts, folder = ["<section id=preflight><h2>Pre-flight</h2>"], facts.out / REPORT_DIR
    if not facts.subjects:
        parts.append("<p class=absent>No run_info.json: the photos and checks of this run were not recorded.</p>")
    for n, s in enumerate(facts.subjects):
        used = [Path(p) for p in s.get("instance_images") or []]
        parts.append(f"<h3>Instance photos of <code>{esc(s.get('identifier'))}</code>: {len(used)} used</h3>"
                     "<div class=strip>")
        for photo in used:
            thumb = folder / "instance" / f"{source_key(photo)}.png"
            if thumbnail(photo, thumb):
                parts.append(_figure(facts, thumb, esc(photo.name), photo.name))
            else:
                parts.append(f"<p class=absent>{esc(photo.name)}: no longer readable</p>")
        parts.append("</div>")
        if "rejected" not in s:
            parts.append("<p class=absent>Rejected files were not recorded by this run.</p>")
        elif s["rejected"]:
            parts.append("<h3>Rejected</h3>" + _file_reasons("rejected", s["rejected"]))
        else:
            parts.append("<p>No file was rejected.</p>")
        if s.get("image_notes"):
            parts.append(_file_reasons("notes", s["image_notes"]))
        parts.append(_class_strip(facts, n, s))
    warnings = (facts.info or {}).get("warnings")
    if warnings:
        parts.append("<h3>Warnings</h3><ul class=warnings>" + "".join(f"<li>{esc(w)}</li>" for w in warnings)
                     + "</ul>")
    elif warnings is not None:
        parts.append("<p>No warnings.</p>")
    return "".join(parts) + "</section>"


def _file_reasons(kind: str, entries: list[dict]) -> str:
    """Files pre-flight set aside or remarked on, each with its reason."""
    return f"<ul class={kind}>" + "".join(f"<li><code>{esc(Path(r['file']).name)}</code>: {esc(r['reason'])}</li>"
                                          for r in entries) + "</ul>"


def _class_strip(facts: RunFacts, n: int, subject: dict) -> str:
    if not subject.get("class_dir"):
        return "<p class=dim>No class images: trained without prior preservation.</p>"
    folder = Path(subject["class_dir"])
    shown = []
    for image in class_images(folder, CLASS_STRIP):
        thumb = facts.out / REPORT_DIR / "class" / f"{source_key(image)}.png"
        if thumbnail(image, thumb):
            shown.append(_figure(facts, thumb, esc(image.name), image.name))
    if not shown:
        return f"<p class=absent>No class images in {esc(folder)} any more.</p>"
    return (f"<h3>Class images ({esc(subject.get('class_prompt') or '')}), from {esc(folder)}</h3>"
            f"<div class=strip>{''.join(shown)}</div>")


def curves_section(facts: RunFacts) -> str:
    image = facts.out / REPORT_DIR / "curves.png"
    if not draw_curves(facts, image):
        return (f"<section id=curves><h2>Curves</h2><p class=absent>No training log yet "
                f"({esc(facts.logging_dir)}/train_log.jsonl).</p></section>")
    first, last = facts.log[0]["step"], facts.log[-1]["step"]
    return (f"<section id=curves><h2>Curves</h2><img id=curves-image src=\"{src(facts.out, image)}\" "
            f"alt=\"loss and learning rate against step\"><p class=dim>{len(facts.log)} logged steps, {first} to "
            f"{last}; smoothed with an exponential moving average (weight 0.9).</p></section>")


def prompt_kind(prompt: str | None, identifiers: list[str], facts: RunFacts) -> str:
    if prompt is None:
        return "grid"
    if any(i in prompt for i in identifiers):
        return "identifier prompt"
    classes = [w for s in facts.subjects for w in (s.get("class_word"), s.get("class_prompt")) if w]
    return "class prompt" if any(w in prompt for w in classes) else "prompt"


def samples_section(facts: RunFacts) -> str:
    """Per validation step, one row per prompt (identifier prompts first): overfitting shows down the page."""
    if not facts.samples:
        return ("<section id=samples><h2>Samples</h2><p class=absent>No validation samples (samples/step-N.png): "
                "the run has no validation prompts, or has not reached its first validation.</p></section>")
    identifiers = [s.get("identifier") for s in facts.subjects if s.get("identifier")]
    prompts = prompt_rows(facts)
    rows = []
    for step in facts.samples:
        rows.append(f"<tr class=step-head><th colspan=2>step {step.step}</th></tr>")
        groups = [(p, [i for i in step.images if i.prompt == p]) for p in prompts]
        groups += [(None, [i for i in step.images if i.prompt is None])]
        for prompt, images in groups:
            if not images:
                continue
            kind = prompt_kind(prompt, identifiers, facts)
            cells = []
            for image in images:
                path = sample_file(facts, image)
                seed = f" · seed {esc(image.seed)}" if image.seed is not None else ""
                if path is not None:
                    cells.append(_figure(facts, path, f"step {step.step}{seed}", f"{prompt or 'grid'}, step "
                                         f"{step.step}"))
            label = f"<span class=dim>{kind}</span><br>{esc(prompt)}" if prompt else "<span class=dim>grid</span>"
            rows.append(f"<tr class=sample-row data-step={step.step} data-kind=\"{kind}\"><th>{label}</th>"
                        f"<td><div class=strip>{''.join(cells)}</div></td></tr>")
    return f"<section id=samples><h2>Samples</h2><table class=samples>{''.join(rows)}</table></section>"


def checkpoints_section(facts: RunFacts) -> str:
    if not facts.checkpoints:
        return "<section id=checkpoints><h2>Checkpoints</h2><p class=absent>No checkpoint or final model yet.</p>" \
               "</section>"
    keys = measured_keys(facts)
    head = "".join(f"<th>{esc(MEASURE_LABELS[k])}</th>" for k in keys)
    rows = []
    for c in facts.checkpoints:
        cells = "".join(f"<td>{c.metrics[k]:.3f}</td>" if c.metrics and isinstance(c.metrics.get(k), (int, float))
                        else "<td>-</td>" for k in keys)
        mark = " <strong class=best>best</strong>" if c.best else ""
        rows.append(f"<tr class=\"checkpoint{' best' if c.best else ''}\"><td>{esc(c.name)}{mark}</td>"
                    f"<td>{esc(c.step if c.step is not None else '-')}</td><td>{esc(_size(c.size_bytes))}</td>"
                    f"{cells}</tr>")
    parts = [f"<section id=checkpoints><h2>Checkpoints</h2><table class=checkpoints><tr><th>checkpoint</th>"
             f"<th>step</th><th>size</th>{head}</tr>{''.join(rows)}</table>"]
    evaluation = facts.evaluation or {}
    if evaluation.get("best"):
        parts.append(f"<p>Best: <strong>{esc(evaluation['best'])}</strong>, {esc(evaluation.get('why', ''))}. "
                     "Export that one.</p>")
    image = facts.out / REPORT_DIR / "checkpoints.png"
    if draw_measures(facts, image):
        parts.append(f"<img id=measures-image src=\"{src(facts.out, image)}\" alt=\"measures against step\">")
    elif not keys:
        parts.append("<p class=dim>Not measured: <code>dreambooth evaluate --model RUN_DIR --checkpoints all "
                     "...</code> adds DINO, CLIP-I and CLIP-T (or the built-in world's measures) here.</p>")
    return "".join(parts) + "</section>"


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}h3{font-size:1.05em}
table.facts th{text-align:left;padding-right:1.5em;vertical-align:top;font-weight:600}
.dim{color:#777}.absent{color:#a60}.best{color:#070}
.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center}figure img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;
background:#eee}figcaption{font-size:11px;color:#555;max-width:128px;overflow-wrap:anywhere}
table.samples th{text-align:left;vertical-align:top;max-width:220px;font-weight:normal}
tr.step-head th{padding-top:1em;font-weight:600}
table.checkpoints{border-collapse:collapse}table.checkpoints td,table.checkpoints th{padding:2px 10px;
border-bottom:1px solid #ddd;text-align:right}tr.best{background:#eaf6ea}
#curves-image{max-width:100%}pre{background:#f6f6f6;padding:.8em;overflow:auto;max-height:30em}
"""


def render(facts: RunFacts) -> str:
    """The page's HTML; draws the images it needs into OUTPUT_DIR/report/ on the way."""
    info = facts.info or {}
    title = f"Run report: {info.get('run_id') or facts.out.name}"
    body = [run_section(facts), preflight_section(facts), curves_section(facts), samples_section(facts),
            checkpoints_section(facts)]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<meta name=viewport content=\"width=device-width\"><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=dim>{esc(facts.out)} · {esc(facts.status)} · written {stamp} · "
            "<a href=\"#curves\">curves</a> · <a href=\"#samples\">samples</a> · "
            f"<a href=\"#checkpoints\">checkpoints</a></p>{''.join(body)}</body></html>\n")


def write_report(out: Path, status: str | None = None) -> Path:
    """OUTPUT_DIR/report.html from what the folder holds, its images first and the page last; `status` is the
    writing run's own word for where it is, when it knows better than the folder (see report.gather)."""
    out = Path(out)
    facts = gather(out, status)
    page = render(facts)
    path = out / REPORT_PAGE
    write_text_atomic(path, page)
    return path


# ---------------------------------------------------------------------------------------------- callers


def peak_memory(device) -> tuple[int | None, str]:
    """The run's peak memory: torch's allocations on a GPU, the process's resident set on the CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device)), "GPU, allocated by torch"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process resident set"
    except (ImportError, OSError):  # no `resource` off Unix
        return None, ""


def refresh_report(run, final: bool = False, status: str | None = None) -> Path | None:
    """The loop's one call (at validation, checkpoint, the end, and a stop or failure: `status`): a report that
    fails costs a warning, not the run. `final`: the final model was just saved, at this step."""
    if not run.accelerator.is_main_process:
        return None
    try:
        started = (gather_started(run.out) or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record_progress(run.out, f"{os.getpid()} {started}", _epoch(started), run.global_step,
                        str(run.accelerator.device), *peak_memory(run.accelerator.device), final=final)
        path = write_report(run.out, "finished" if final else status)
    except Exception as e:  # noqa: BLE001 - anything: the report is a view of the run, never a reason to end it
        print(f"warning: the run report was not written ({type(e).__name__}: {e}); the run goes on")
        return None
    if final:
        print(f"run report: {path}")
    return path


def gather_started(out: Path) -> str | None:
    return (read_json(out / RUN_INFO) or {}).get("started")


def _epoch(started: str) -> float:
    try:
        return datetime.strptime(started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return time.time()


def report_command(options) -> Path:
    """`dreambooth report`: `options` is a command_options.ReportOptions."""
    path = write_report(options.output_dir)
    print(f"run report: {path}")
    if options.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return path
