"""A report people can look at: one HTML page and the PNGs it shows, in one folder.

`write_report` turns the outcome of a run (metrics, the model comparison, the stages and their
timings, every query's answer, the training history) into `report.html` plus:

    precision_recall.png   precision against recall over the global ranking of predictions,
                           with the operating threshold (the one Serve flags copies with) marked
    scores.png             best score of each query: copies against unrelated photos, threshold
    gallery-N.png          queries beside the reference they matched, with scores; misses, wrong
                           matches and false positives first, each card framed in its colour;
                           with local verification, the inlier matches drawn as lines between
                           the two images and the matched regions as boxes
    training.png           the fine-tune's loss terms and teacher agreement per step

The page is static: no scripts, no remote resources, images by relative path, so the folder can
be copied, attached or opened from disk in any browser. Figures are drawn with matplotlib's Agg
canvas (no display, no pyplot state), so reports can be written from threads and servers.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rdcd.metrics import GroundTruth, Match, precision_recall

log = logging.getLogger(__name__)

STATUS_COLOURS = {
    "found": "#2e7d32",
    "rejected": "#607d8b",
    "missed": "#ef6c00",
    "wrong match": "#c62828",
    "false positive": "#c62828",
    "error": "#6a1b9a",
}
STATUS_ORDER = ("wrong match", "false positive", "missed", "error", "found", "rejected")
GALLERY_PER_PAGE = 20
GALLERY_MAX = 60
THUMB = 192


@dataclass
class GalleryItem:
    """One query and what the system answered for it (its best match and the copy decision)."""

    query_id: str
    query_uri: str
    expected_id: str | None = None  # the reference it is a copy of; None for an unrelated photo
    expected_uri: str | None = None
    match_id: str | None = None  # the best-scoring reference
    match_uri: str | None = None
    score: float | None = None
    raw_score: float | None = None
    is_copy: bool = False
    error: str | None = None  # the query could not be answered (e.g. not an image)
    inliers: int | None = None  # local verification: geometric inliers of the best match
    pairs: Any = None  # float [n, 4]: query x, y, reference x, y of the inliers (original px)
    query_region: Sequence[float] | None = None  # x0, y0, x1, y1 in query pixels
    reference_region: Sequence[float] | None = None  # the same in reference pixels

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.expected_id is not None:
            if self.is_copy and self.match_id == self.expected_id:
                return "found"
            return "wrong match" if self.is_copy else "missed"
        return "false positive" if self.is_copy else "rejected"


@dataclass
class ReportData:
    """Everything the page shows. Metric values are floats (printed with 4 decimals) or None."""

    title: str
    headline: str  # one sentence: what was found
    metrics: dict[str, float | None]  # label -> value, the figures the run printed
    predictions: list[Match]  # for the precision-recall curve
    ground_truth: GroundTruth
    threshold: float  # the operating threshold (what Serve flags `is_copy` with)
    gallery: list[GalleryItem]
    models: list[dict[str, Any]] = field(default_factory=list)  # rows of the model comparison
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # name, seconds, detail
    history: list[dict[str, float]] = field(default_factory=list)  # fine-tune metrics per step
    notes: list[str] = field(default_factory=list)  # decisions and caveats, in plain words
    facts: list[tuple[str, str]] = field(default_factory=list)  # label, value (setup, files...)
    threshold_label: str = "the operating threshold"


def fmt(value: Any) -> str:
    """How metrics are printed everywhere (CLI and report): 4 decimals, or the value as text."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


# ---- figures --------------------------------------------------------------------------------


def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def operating_point(
    predictions: list[Match], gt: GroundTruth, threshold: float
) -> tuple[float, float, int]:
    """(precision, recall, predictions kept) of the predictions scoring >= `threshold`."""
    pr = precision_recall(predictions, gt)
    kept = int(np.sum(pr.scores >= threshold))
    if kept == 0:
        return 1.0, 0.0, 0
    return float(pr.precision[kept - 1]), float(pr.recall[kept - 1]), kept


def plot_precision_recall(
    predictions: list[Match],
    gt: GroundTruth,
    threshold: float,
    path: str,
    label: str = "the operating threshold",
) -> dict[str, float]:
    """The precision-recall curve of the global ranking, the operating point marked on it."""
    pr = precision_recall(predictions, gt)
    p_op, r_op, kept = operating_point(predictions, gt, threshold)
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    if len(pr.recall):
        ax.step(np.r_[0.0, pr.recall], np.r_[1.0, pr.precision], where="post", color="#1565c0",
                lw=2, label="all predictions, ranked by score")  # fmt: skip
    ax.plot([r_op], [p_op], "o", ms=10, color="#c62828",
            label=f"{label} {threshold:.3g}: precision {p_op:.3f}, recall {r_op:.3f}")  # fmt: skip
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), xlabel="recall (share of copies found)",
           ylabel="precision (share of flagged pairs that are copies)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"Precision-recall over {len(predictions)} predictions, {len(gt.pairs)} copies")
    fig.tight_layout()
    fig.savefig(path)
    return {"precision": p_op, "recall": r_op, "kept": kept}


def plot_scores(items: Sequence[GalleryItem], threshold: float, path: str) -> None:
    """Best score per query: copies (their true reference's score when it is the best) against
    unrelated photos, with the threshold between them."""
    copies = [i.score for i in items if i.expected_id and i.score is not None]
    unrelated = [i.score for i in items if not i.expected_id and i.score is not None]
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    values = copies + unrelated + [threshold]
    bins = np.linspace(min(values) - 0.02, max(values) + 0.02, 30)
    ax.hist(copies, bins=bins, color="#2e7d32", alpha=0.7, label=f"edited copies ({len(copies)})")
    ax.hist(unrelated, bins=bins, color="#607d8b", alpha=0.7,
            label=f"unrelated photos ({len(unrelated)})")  # fmt: skip
    ax.axvline(threshold, color="#c62828", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="score of the best match", ylabel="queries")
    ax.legend(fontsize=8)
    ax.set_title("Best-match score of every query")
    fig.tight_layout()
    fig.savefig(path)


def plot_training(history: Sequence[dict[str, float]], path: str) -> None:
    """Loss terms (and their sum) per step, faint, with their running mean over 5 steps, and
    the student-teacher agreement."""
    steps = [h.get("step", i + 1) for i, h in enumerate(history)]
    fig = _figure(8.0, 3.6)
    ax, ax2 = fig.subplots(1, 2)
    names = {"loss": "total", "loss_con": "L_con (contrastive)", "loss_rel": "L_rel (relational)",
             "loss_hn": "L_hn (hard negative)", "loss_feat": "L_feat (feature)"}  # fmt: skip
    for key, label in names.items():
        ys = np.array([math.nan if h.get(key) is None else h[key] for h in history], float)
        if np.isnan(ys).all():
            continue
        line = ax.plot(steps, ys, lw=1.0, alpha=0.35)[0]
        # one batch of a few images is a noisy estimate: the running mean shows the trend
        w = max(1, min(5, len(ys) // 4))
        trend = np.convolve(np.nan_to_num(ys), np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], trend, color=line.get_color(), label=label,
                lw=2.4 if key == "loss" else 1.6)  # fmt: skip
    ax.set(xlabel="step", ylabel="loss", title="Distillation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ag = [h.get("agreement", math.nan) for h in history]
    ax2.plot(steps, ag, color="#6a1b9a")
    ax2.set(xlabel="step", ylabel="correlation", title="Student-teacher agreement", ylim=(-1, 1))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _thumb(uri: str | None) -> np.ndarray | None:
    got = _thumb_scaled(uri)
    return None if got is None else got[0]


def _thumb_scaled(uri: str | None) -> tuple[np.ndarray, float] | None:
    """A thumbnail and its scale from the original (EXIF-transposed) pixels, so keypoints in
    original pixels can be drawn on it."""
    if not uri:
        return None
    from PIL import Image

    from rdcd import io as rio
    from rdcd.decode import DecodeError, decode_image

    try:
        img = decode_image(rio.read_bytes(uri))
    except (DecodeError, rio.StorageError, OSError) as exc:
        log.warning("report: no thumbnail of %s: %s", uri, exc)
        return None
    width = img.size[0]
    img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(img.convert("RGB")), img.size[0] / max(1, width)


MAX_LINES = 40  # inlier matches drawn per card (a random but fixed subset of them)


def _draw_matches(fig, axes: list, scales: list[float], item: GalleryItem) -> None:
    """Lines from the query panel to the match panel between inlier keypoints, and the matched
    region of each image as a box."""
    from matplotlib.patches import ConnectionPatch, Rectangle

    (qa, ra), (qs, rs) = axes, scales
    for ax, box, s in ((qa, item.query_region, qs), (ra, item.reference_region, rs)):
        if box is not None:
            x0, y0, x1, y1 = (float(v) * s for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                   edgecolor="#ffeb3b"))  # fmt: skip
    pairs = np.asarray(item.pairs if item.pairs is not None else np.zeros((0, 4)), np.float64)
    if len(pairs) > MAX_LINES:
        pairs = pairs[np.random.default_rng(0).choice(len(pairs), MAX_LINES, replace=False)]
    for qx, qy, rx, ry in pairs:
        fig.add_artist(ConnectionPatch(xyA=(qx * qs, qy * qs), coordsA=qa.transData,
                                       xyB=(rx * rs, ry * rs), coordsB=ra.transData,
                                       color="#00e5ff", lw=0.6, alpha=0.7))  # fmt: skip


def gallery_order(items: Sequence[GalleryItem], limit: int = GALLERY_MAX) -> list[GalleryItem]:
    """Mistakes first (wrong matches, false positives, misses, errors), then hits; at most
    `limit` items, mistakes always before hits when something must be left out."""
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    ordered = sorted(items, key=lambda i: (rank[i.status], i.query_id))
    return ordered[:limit]


def plot_gallery(items: Sequence[GalleryItem], path: str, title: str = "") -> None:
    """Cards of three panels: the query, the reference it matched best, and (when that is not
    the right one) the reference it is really a copy of; framed in the colour of the outcome."""
    from matplotlib.patches import Rectangle

    per_row, panel, gap, pad, head, foot = 2, 1.9, 0.08, 0.12, 0.55, 0.28
    card_w = 3 * panel + 2 * gap + 2 * pad
    card_h = head + panel + foot
    rows = max(1, math.ceil(len(items) / per_row))
    top = 0.5 if title else 0.1
    width, height = per_row * card_w + (per_row + 1) * 0.15, rows * (card_h + 0.15) + top
    fig = _figure(width, height, dpi=80)
    if title:
        fig.text(0.5, 1 - 0.3 / height, title, ha="center", va="center", fontsize=13)
    for n, item in enumerate(items):
        r, c = divmod(n, per_row)
        x0 = 0.15 + c * (card_w + 0.15)
        y0 = height - top - (r + 1) * (card_h + 0.15) + 0.15
        colour = STATUS_COLOURS[item.status]
        fig.patches.append(Rectangle((x0 / width, y0 / height), card_w / width, card_h / height,
                                     transform=fig.transFigure, fill=False, lw=3,
                                     edgecolor=colour))  # fmt: skip
        head_text = f"{item.query_id}: {item.status.upper()}"
        if item.error:
            sub = item.error[:70]
        elif item.score is not None:
            sub = f"best {item.match_id}  score {item.score:.3f}"
            if item.raw_score is not None:
                sub += f"  (cosine {item.raw_score:.3f})"
            if item.inliers is not None:
                sub += f"  {item.inliers} inliers"
        else:
            sub = "no match"
        fig.text((x0 + pad) / width, (y0 + card_h - 0.2) / height, head_text, color=colour,
                 fontsize=11, fontweight="bold", va="center")  # fmt: skip
        fig.text((x0 + pad) / width, (y0 + card_h - 0.43) / height, sub, fontsize=9,
                 va="center")  # fmt: skip
        show_expected = item.expected_id is not None and item.match_id != item.expected_id
        panels = [
            (item.query_uri, "query"),
            (item.match_uri, f"best match {item.match_id or ''}"),
            (item.expected_uri if show_expected else None,
             f"true reference {item.expected_id}" if show_expected else ""),
        ]  # fmt: skip
        drawn: list = []
        for p, (uri, caption) in enumerate(panels):
            px = x0 + pad + p * (panel + gap)
            ax = fig.add_axes(((px / width), (y0 + foot) / height, panel / width, panel / height))
            ax.set_axis_off()
            got = _thumb_scaled(uri)
            if got is not None:
                ax.imshow(got[0])
                ax.set_aspect("equal")
                drawn.append((ax, got[1]))
            else:
                drawn.append(None)
            if caption:
                ax.text(0.5, -0.04, caption, transform=ax.transAxes, ha="center", va="top",
                        fontsize=8)  # fmt: skip
        if item.inliers and drawn[0] is not None and drawn[1] is not None:
            (qa, qs), (ra, rs) = drawn[0], drawn[1]
            _draw_matches(fig, [qa, ra], [qs, rs], item)
    fig.savefig(path)


# ---- the page -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.headline{font-size:1.2rem;background:#f1f8e9;border-left:5px solid #2e7d32;padding:.6rem 1rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;
text-align:left}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.legend span{display:inline-block;padding:0 .5rem;
margin-right:.4rem;color:#fff;border-radius:3px}.note{color:#444}code{background:#f5f5f5;
padding:0 .2rem}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) or v is None else ""
            cells.append(f"<td{cls}>{html.escape(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def render_html(data: ReportData, images: dict[str, list[str]], point: dict[str, float]) -> str:
    """The page; `images` maps a section to its PNG file names (relative to the page)."""
    e = html.escape
    counts: dict[str, int] = {}
    for item in data.gallery:
        counts[item.status] = counts.get(item.status, 0) + 1
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(data.title)}</h1>",
        f'<p class="headline">{e(data.headline)}</p>',
        "<h2>Metrics</h2>",
        _table(["metric", "value"], [(k, v) for k, v in data.metrics.items()]),
        f"<p>At {e(data.threshold_label)} <b>{data.threshold:.4g}</b>: precision "
        f"{point['precision']:.4f}, recall {point['recall']:.4f} over {point['kept']} flagged "
        "pairs. µAP ranks every (query, reference) prediction of every query in one list; "
        "score normalisation subtracts each query's similarity to a background of unrelated "
        "photos.</p>",
    ]
    if data.models:
        keys = list(data.models[0])
        parts += ["<h2>Models</h2>", _table(keys, [[m.get(k) for k in keys] for m in data.models])]
    if data.notes:
        parts.append("<ul>" + "".join(f'<li class="note">{e(n)}</li>' for n in data.notes))
        parts.append("</ul>")
    legend = "".join(
        f'<span style="background:{STATUS_COLOURS[s]}">{e(s)}: {counts.get(s, 0)}</span>'
        for s in STATUS_ORDER
    )
    parts += [
        "<h2>Queries and their matches</h2>",
        f'<p class="legend">{legend}</p>',
        "<p>Each card: the query, the reference that scored best, and, for a miss or a wrong "
        "match, the reference it really copies. Mistakes come first.</p>",
    ]
    parts += [f'<p><img src="{e(p)}" alt="gallery of queries and matches"></p>'
              for p in images.get("gallery", [])]  # fmt: skip
    parts += ["<h2>Precision and recall</h2>"]
    parts += [f'<p><img src="{e(p)}" alt="precision-recall curve"></p>'
              for p in images.get("pr", [])]  # fmt: skip
    parts += [f'<p><img src="{e(p)}" alt="best-match scores"></p>'
              for p in images.get("scores", [])]  # fmt: skip
    parts.append("<h2>Training</h2>")
    if images.get("training"):
        parts += [f'<p><img src="{e(p)}" alt="training loss curves"></p>'
                  for p in images["training"]]  # fmt: skip
    else:
        parts.append("<p>No fine-tune ran in this run.</p>")
    if data.stages:
        parts += [
            "<h2>Pipeline</h2>",
            _table(["stage", "seconds", "what"], [(n, round(s, 1), d) for n, s, d in data.stages]),
        ]
    if data.facts:
        parts += ["<h2>Setup</h2>", _table(["", ""], data.facts)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(data: ReportData, folder: str) -> str:
    """Write `report.html` and its PNGs into `folder` (a local directory); returns the page's
    path. Figures that cannot be drawn (no predictions, no history) are left out, not faked."""
    os.makedirs(folder, exist_ok=True)
    images: dict[str, list[str]] = {}

    def at(name: str) -> str:
        return os.path.join(folder, name)

    point = {"precision": 1.0, "recall": 0.0, "kept": 0}
    if data.predictions and data.ground_truth.pairs:
        point = plot_precision_recall(data.predictions, data.ground_truth, data.threshold,
                                      at("precision_recall.png"), data.threshold_label)  # fmt: skip
        images["pr"] = ["precision_recall.png"]
    if any(i.score is not None for i in data.gallery):
        plot_scores(data.gallery, data.threshold, at("scores.png"))
        images["scores"] = ["scores.png"]
    shown = gallery_order(data.gallery)
    pages = [shown[i : i + GALLERY_PER_PAGE] for i in range(0, len(shown), GALLERY_PER_PAGE)]
    for n, page in enumerate(pages, start=1):
        name = f"gallery-{n}.png"
        more = f" (of {len(data.gallery)})" if len(shown) < len(data.gallery) else ""
        plot_gallery(page, at(name), f"Queries {1 + (n - 1) * GALLERY_PER_PAGE}-"
                     f"{(n - 1) * GALLERY_PER_PAGE + len(page)}{more}")  # fmt: skip
        images.setdefault("gallery", []).append(name)
    if data.history:
        plot_training(data.history, at("training.png"))
        images["training"] = ["training.png"]
    page = at("report.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write(render_html(data, images, point))
    log.info("report: %s (%s)", page, ", ".join(p for ps in images.values() for p in ps))
    return page


__all__ = [
    "GalleryItem",
    "ReportData",
    "fmt",
    "gallery_order",
    "operating_point",
    "plot_gallery",
    "plot_precision_recall",
    "plot_scores",
    "plot_training",
    "render_html",
    "write_report",
]
