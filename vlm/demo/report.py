"""The demo's report: scores of the held-out captions, confusion matrices, the two plots, report.json and
the table printed at the end. A control run adds `blind_attribute_accuracy` to the main run's report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlm.config.entries import DemoEntry
from vlm.demo.plots import plot_confusion, plot_curves, stage_losses
from vlm.demo.probe import confusion


def _accuracy(preds: dict[str, str], attrs: dict[str, dict[str, str]]) -> dict[str, float]:
    from eval.caption import attribute_accuracy

    acc = attribute_accuracy(preds, attrs)
    return {"color": acc["color"], "shape": acc["shape"], "motion": acc["motion"], "all": acc["all"]}


def finish_report(
    cfg: DemoEntry,
    out: Path,
    run: Path,
    val: list[dict[str, Any]],
    preds: dict[str, str],
    stage1_preds: dict[str, str] | None,
    warmups: dict[str, dict[str, Any]],
    facts: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    from eval.caption import score_captions

    t = time.time()
    refs = {r["rel"]: r["captions"] for r in val}
    attrs = {r["rel"]: r["attributes"] for r in val}
    acc = _accuracy(preds, attrs)
    scores = score_captions(preds, refs, tokenize="morpheme")
    matrices = confusion(preds, attrs)
    # Where held-out accuracy was measured: linear probes of the tower, then the captions themselves.
    points = {f"probe ({k.split()[0]} tower)": v for k, v in warmups["vision"]["probe"].items()}
    if stage1_preds is not None:
        points["stage 1 captions"] = _accuracy(stage1_preds, attrs)
    points["stage 2 captions"] = acc
    tag = "control" if cfg.control else "main"
    curves = plot_curves(
        run / "curves.png" if cfg.control else out / "curves.png",
        {k: v.get("curve", []) for k, v in warmups.items()},
        {"stage 1": stage_losses(run / "stage1"), "stage 2": stage_losses(run / "stage2")},
        points,
    )
    conf_png = plot_confusion(
        run / "confusion.png" if cfg.control else out / "confusion.png", matrices,
        f"seed {cfg.seed} {tag}: attribute accuracy {acc['all']:.3f} on {len(preds)} held-out clips",
    )  # fmt: skip
    facts["times"]["report"] = time.time() - t
    result = {
        "attribute_accuracy": acc["all"],  # colour, shape and motion all right
        "per_attribute": {k: acc[k] for k in ("color", "shape", "motion")},
        "cider_d": scores["CIDEr-D"],
        "bleu4": scores["BLEU-4"],
        "rouge_l": scores["ROUGE-L"],
        "chrf": scores["chrF"],
        "accuracy_by_point": points,
        "probe": warmups["vision"]["probe"],
        "token_probe": warmups["vision"].get("token_probe"),  # absent in warm-ups cached before it existed
        "confusion": matrices,
        **facts,
        "total_seconds": time.time() - t0,
        "load_average_end": os.getloadavg(),
        "warmups": {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in warmups.items()},
        "n_val": len(preds),
        "plots": {"curves": str(curves), "confusion": str(conf_png)},
        "settings": asdict(cfg),
        "examples": [{"video": v, "caption": c, "reference": refs[v][0]} for v, c in list(preds.items())[:5]],
    }
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if cfg.control:
        report["blind_attribute_accuracy"] = result["attribute_accuracy"]
        report["blind"] = result
    else:
        report = {k: v for k, v in report.items() if k in ("blind_attribute_accuracy", "blind")} | result
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, ensure_ascii=False, indent=2))
    print_summary(result, report.get("blind_attribute_accuracy"), report_path)
    return report


def print_summary(r: dict[str, Any], blind: float | None, path: Path) -> None:
    print(f"\n| held-out (n={r['n_val']}) | colour | shape | motion | all three |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, a in r["accuracy_by_point"].items():
        cells = " | ".join(f"{a[k]:.3f}" if k in a else "–" for k in ("color", "shape", "motion", "all"))
        print(f"| {name} | {cells} |")
    if blind is not None:
        print(f"blind control (all-zero frames): attribute accuracy {blind:.3f}")
    times = " · ".join(f"{k} {v:.0f} s" for k, v in r["times"].items())
    load = ", ".join(f"{x:.2f}" for x in r["load_average_end"])
    print(f"CIDEr-D {r['cider_d']:.3f} · chrF {r['chrf']:.3f} · {r['precision']} · {r['threads']} thread(s)")
    print(f"wall time {r['total_seconds']:.0f} s ({times}); load average at the end {load}")
    for ex in r["examples"][:3]:
        print(f"  {ex['video']}: {ex['caption']}   (ref: {ex['reference']})")
    print(f"report: {path}\ncurves: {r['plots']['curves']}\nconfusion: {r['plots']['confusion']}")
