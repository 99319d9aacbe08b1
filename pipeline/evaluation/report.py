"""The evaluation report: per-case records in, one JSON document and one self-contained HTML page out.

Pure: the records come from the caller (one per case, as ``daemon.pipelines.evaluation`` writes
them), the generation time is passed in, and the plots are inline SVG written here (no plotting
library, no scripts, no external resources), so the page opens anywhere, offline.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.evaluation.metrics import (
    SIZE_BANDS,
    Estimate,
    LesionMatch,
    band_rates,
    bootstrap_ci,
    calibration,
    confusion,
    roc_curve,
    study_metrics,
    threshold_for_sensitivity,
)

__all__ = ["build_report", "render_html"]

DEFINITIONS = (
    "Dice = 2|T∩P| / (|T|+|P|) on the analysed series' grid (any non-zero label is foreground); "
    "undefined when both masks are empty.",
    "Volume error = predicted minus true volume (mL); relative to the true volume where there is one.",
    "Lesions are 6-connected components. A true lesion is detected when the predicted components that "
    "overlap it have a Dice >= 0.1 with it (sensitivity); a predicted lesion is a true positive when it "
    "overlaps a true lesion (PPV). Each lesion counts in the size band of its own volume.",
    "Study level: the score is the highest probability of a class that counts for triage (else 1 when a "
    "counted lesion was found, 0 otherwise); a study is called positive when score >= threshold. The "
    "truth is the labels CSV, else whether the truth mask has a voxel.",
    "95 % confidence intervals: percentile bootstrap over cases (seeded); resamples where a metric is "
    "undefined are left out.",
)


def _estimate(e: Estimate) -> dict[str, float | None]:
    return {"value": e.value, "low": e.low, "high": e.high}


def _mean_ci(values: Sequence[float], resamples: int, seed: int) -> dict[str, float | None]:
    data = np.asarray(values, dtype=float)
    if not len(data):
        return {"value": None, "low": None, "high": None}
    low, high = bootstrap_ci(lambda idx: float(data[idx].mean()), len(data), resamples=resamples, seed=seed)
    return {"value": float(data.mean()), "low": low, "high": high}


def _confusion(c: Any) -> dict[str, Any]:
    return {
        **asdict(c),
        **{k: getattr(c, k) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")},
    }


def build_report(
    records: Sequence[Mapping[str, Any]],
    *,
    labels: Mapping[str, bool],
    pipeline: str,
    threshold: float,
    threshold_source: str,
    target_sensitivity: float,
    generated_at: str,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregate the case records into the report document (the JSON the HTML is rendered from)."""
    ok = [r for r in records if r.get("status") == "ok"]
    segmented = [r for r in ok if "segmentation" in r]
    dice = [r["segmentation"]["dice"] for r in segmented if r["segmentation"]["dice"] is not None]
    errors = [abs(r["segmentation"]["volume_error_ml"]) for r in segmented]
    true_lesions = [LesionMatch(**m) for r in segmented for m in r["segmentation"]["true_lesions"]]
    predicted_lesions = [LesionMatch(**m) for r in segmented for m in r["segmentation"]["predicted_lesions"]]

    study_rows, unlabelled = [], []
    for r in ok:
        if r["case"] in labels:
            truth, source = labels[r["case"]], "labels CSV"
        elif "segmentation" in r:
            truth, source = r["segmentation"]["truth_ml"] > 0, "truth mask"
        else:
            unlabelled.append(r["case"])
            continue
        study_rows.append(
            {"case": r["case"], "score": float(r["score"]), "truth": bool(truth), "truth_source": source}
        )
    scores = [row["score"] for row in study_rows]
    truths = [row["truth"] for row in study_rows]
    study: dict[str, Any] = {"cases": study_rows, "unlabelled": unlabelled}
    if study_rows:
        at_target = threshold_for_sensitivity(scores, truths, target_sensitivity)
        bins, ece = calibration(scores, truths)
        study.update(
            metrics={k: _estimate(v) for k, v in study_metrics(scores, truths, threshold, resamples=resamples, seed=seed).items()},
            confusion=_confusion(confusion(scores, truths, threshold)),
            target=None if at_target is None else _confusion(confusion(scores, truths, at_target)),
            roc=[list(p) for p in roc_curve(scores, truths)],
            calibration={"bins": [asdict(b) for b in bins], "ece": ece},
        )  # fmt: skip
    return {
        "pipeline": pipeline,
        "generated_at": generated_at,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "target_sensitivity": target_sensitivity,
        "bootstrap": {"resamples": resamples, "seed": seed},
        "counts": {
            "cases": len(records),
            "ok": len(ok),
            "refused": sum(r.get("status") == "refused" for r in records),
            "failed": sum(r.get("status") == "failed" for r in records),
            "with_mask": len(segmented),
            "study_level": len(study_rows),
        },
        "segmentation": {
            "mean_dice": _mean_ci(dice, resamples, seed),
            "mean_abs_volume_error_ml": _mean_ci(errors, resamples, seed),
            "lesion_sensitivity": [
                asdict(b) | {"rate": b.rate} for b in band_rates(true_lesions, SIZE_BANDS)
            ],
            "lesion_ppv": [asdict(b) | {"rate": b.rate} for b in band_rates(predicted_lesions, SIZE_BANDS)],
        },
        "study": study,
        "cases": [dict(r) for r in records],
        "failures": [
            {"case": r["case"], "status": r.get("status"), "reason": r.get("reason", "")}
            for r in records
            if r.get("status") != "ok"
        ],
        "definitions": list(DEFINITIONS),
    }


# --- HTML ----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _ci(e: Mapping[str, Any]) -> str:
    if e.get("value") is None:
        return "–"
    return f"{_fmt(e['value'])} <span class=ci>[{_fmt(e.get('low'))}, {_fmt(e.get('high'))}]</span>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plot(title: str, xlabel: str, ylabel: str, lines: Sequence[Sequence[tuple[float, float]]],
          points: Sequence[tuple[float, float]] = (), diagonal: bool = True) -> str:  # fmt: skip
    """A 0..1 x 0..1 line/point plot as inline SVG."""
    size, pad = 260, 40

    def xy(x: float, y: float) -> str:
        return f"{pad + x * size:.1f},{pad + (1 - y) * size:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}" '
        f'width="{size + 2 * pad}" height="{size + 2 * pad}" class=plot>',
        f"<title>{html.escape(title)}</title>",
        f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#888"/>',
    ]
    for t in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{pad + t * size:.0f}" y="{pad + size + 14}" text-anchor="middle">{t:g}</text>'
        )
        parts.append(f'<text x="{pad - 6}" y="{pad + (1 - t) * size + 4:.0f}" text-anchor="end">{t:g}</text>')
    parts.append(
        f'<text x="{pad + size / 2}" y="{pad + size + 30}" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    parts.append(
        f'<text transform="translate(12,{pad + size / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    if diagonal:
        parts.append(
            f'<line x1="{pad}" y1="{pad + size}" x2="{pad + size}" y2="{pad}" stroke="#bbb" stroke-dasharray="4"/>'
        )
    for line in lines:
        coords = " ".join(xy(x, y) for x, y in line)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="#1f5fbf" stroke-width="2"/>')
    for x, y in points:
        cx, cy = xy(x, y).split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="4" fill="#c0392b"/>')
    parts.append("</svg>")
    return "".join(parts)


def _bars(title: str, values: Sequence[tuple[str, float | None]]) -> str:
    """Horizontal bars in 0..1 (per-case Dice), as inline SVG."""
    row, width, label_w = 16, 240, 110
    height = row * max(len(values), 1) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}" '
             f'width="{label_w + width + 50}" height="{height}" class=plot><title>{html.escape(title)}</title>']  # fmt: skip
    for n, (name, value) in enumerate(values):
        y = 5 + n * row
        parts.append(f'<text x="{label_w - 4}" y="{y + 12}" text-anchor="end">{html.escape(name)}</text>')
        if value is not None:
            parts.append(
                f'<rect x="{label_w}" y="{y + 2}" width="{value * width:.1f}" height="{row - 4}" fill="#1f5fbf"/>'
            )
        parts.append(f'<text x="{label_w + (value or 0) * width + 4:.1f}" y="{y + 12}">{_fmt(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.ci{color:#666;font-size:.9em}
.plot text{font-size:11px}.plots{display:flex;gap:2em;flex-wrap:wrap}.refused{color:#a40}"""


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    esc = html.escape
    counts, seg, study = report["counts"], report["segmentation"], report["study"]
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>Evaluation of {esc(report['pipeline'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation of pipeline {esc(report['pipeline'])}</h1>",
        f"<p>Generated {esc(report['generated_at'])}. {counts['cases']} cases: {counts['ok']} analysed, "
        f"{counts['refused']} refused, {counts['failed']} failed; {counts['with_mask']} with a truth mask, "
        f"{counts['study_level']} at study level.</p>",
        "<h2>Study level</h2>",
    ]
    if "metrics" in study:
        m = study["metrics"]
        names = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV", "npv": "NPV",
                 "f1": "F1", "roc_auc": "ROC AUC"}  # fmt: skip
        out.append(f"<p>Threshold {_fmt(report['threshold'])} ({esc(report['threshold_source'])}).</p>")
        out.append(
            _table(["metric", "value [95 % CI]"], [[label, _ci(m[key])] for key, label in names.items()])
        )
        c = study["confusion"]
        out.append(f"<h3>Confusion matrix at threshold {_fmt(report['threshold'])}</h3>")
        out.append(_table(["", "truth positive", "truth negative"],
                          [["called positive", str(c["tp"]), str(c["fp"])],
                           ["called negative", str(c["fn"]), str(c["tn"])]]))  # fmt: skip
        target = study.get("target")
        out.append(f"<h3>Threshold reaching sensitivity {_fmt(report['target_sensitivity'], 2)}</h3>")
        if target is None:
            out.append("<p>None: no positive case.</p>")
        else:
            out.append(_table(["threshold", "sensitivity", "specificity", "PPV", "NPV", "TP", "FP", "TN", "FN"],
                              [[_fmt(target["threshold"]), _fmt(target["sensitivity"]), _fmt(target["specificity"]),
                                _fmt(target["ppv"]), _fmt(target["npv"]), str(target["tp"]), str(target["fp"]),
                                str(target["tn"]), str(target["fn"])]]))  # fmt: skip
        roc = [(p[0], p[1]) for p in study["roc"]] + [(1.0, 1.0)]
        bins = [b for b in study["calibration"]["bins"] if b["count"]]
        reliability = [(b["mean_score"], b["observed"]) for b in bins]
        out.append("<div class=plots>")
        out.append(_plot("ROC curve", "1 - specificity", "sensitivity", [roc]))
        out.append(_plot("Reliability diagram", "mean predicted probability", "observed positive rate",
                         [reliability], reliability))  # fmt: skip
        out.append("</div>")
        out.append(f"<p>Expected calibration error: {_fmt(study['calibration']['ece'])}.</p>")
        out.append(_table(["bin", "cases", "mean score", "observed"],
                          [[f"{b['low']:.1f}–{b['high']:.1f}", str(b["count"]), _fmt(b["mean_score"]), _fmt(b["observed"])]
                           for b in study["calibration"]["bins"]]))  # fmt: skip
    else:
        out.append("<p>No case has a study-level truth (labels CSV or mask).</p>")
    out.append("<h2>Segmentation</h2>")
    out.append(_table(["metric", "value [95 % CI]"], [
        ["mean Dice", _ci(seg["mean_dice"])], ["mean |volume error| (mL)", _ci(seg["mean_abs_volume_error_ml"])]]))  # fmt: skip
    for key, title in (("lesion_sensitivity", "Lesion-wise sensitivity (true lesions)"),
                       ("lesion_ppv", "Lesion-wise PPV (predicted lesions)")):  # fmt: skip
        out.append(f"<h3>{title} by size band</h3>")
        out.append(_table(["size band", "lesions", "matched", "rate"],
                          [[esc(b["band"]), str(b["lesions"]), str(b["matched"]), _fmt(b["rate"])] for b in seg[key]]))  # fmt: skip
    cases = report["cases"]
    dice_bars = [(c["case"], c["segmentation"]["dice"]) for c in cases if "segmentation" in c]
    if dice_bars:
        out.append(_bars("Dice per case", dice_bars))
    out.append("<h2>Cases</h2>")
    rows = []
    for c in cases:
        s = c.get("segmentation", {})
        rows.append([esc(c["case"]), esc(c.get("status", "")), esc(c.get("priority", "")), _fmt(c.get("score")),
                     _fmt(s.get("dice")), _fmt(s.get("truth_ml"), 2), _fmt(c.get("predicted_ml"), 2),
                     _fmt(s.get("volume_error_ml"), 2)])  # fmt: skip
    out.append(
        _table(
            ["case", "status", "priority", "score", "Dice", "true mL", "predicted mL", "volume error mL"],
            rows,
        )
    )
    out.append("<h2>Failures and refusals</h2>")
    if report["failures"]:
        out.append(_table(["case", "status", "reason"],
                          [[esc(f["case"]), f"<span class=refused>{esc(str(f['status']))}</span>", esc(f["reason"])]
                           for f in report["failures"]]))  # fmt: skip
    else:
        out.append("<p>None.</p>")
    out.append(
        "<h2>Definitions</h2><ul>" + "".join(f"<li>{esc(d)}</li>" for d in report["definitions"]) + "</ul>"
    )
    out.append("</body></html>")
    return "\n".join(out)
