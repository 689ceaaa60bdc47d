#!/usr/bin/env python
"""Fit the field-confidence calibration of a model and measure the review flag it gives.

Usage:
    python scripts/calibrate.py [--model models/hwr-digits.onnx] [--write] [--compare OLD.onnx]
                                [--cheque-model TWIN.onnx] [--data DIR] [--mnist DIR] [--json OUT.json]
                                [--plots DIR]

Every field is read exactly as ``hwr-batch process`` reads it (:func:`hwr_batch.read.read_file` or
:func:`hwr_batch.read.read_page`, then :func:`hwr_batch.rows.judge_readings`), and its reading is
compared with the truth.

Fitted on (``fit`` sets; real fields the model never trained on, plus generated forms):
    danish dev: ``danish_row_numbers_train`` rows 17,000 on (held out of the model's training), with the
        labels of ``danish_dev_checked.csv`` (beside this script) put right: the cells read "wrong" with
        the highest out-of-fold confidence, checked by eye; ``checked`` is what the cell reads, empty
        where it is unclear (left out);
    forms fit: 400 generated pages of MNIST **test** digits, seed 11;
    orand A (cross-fitted), with ``--cheque-model M``: ``orand_car_a`` rows 0-539 read by M, a model
        trained by the same recipe as ``--model`` but on the other fold (rows 540 on) instead of these
        rows: the shipped model trained on rows 0-539, so only a twin that never saw them can show how
        such a model reads cheques it has never seen. A ``--compare`` model is fitted on rows 0-539 as
        it reads them itself (it must not have trained on them: the MNIST-only seed has not).
Measured on (``measure`` sets; never fitted or tuned on):
    danish: ``danish_row_numbers`` (digits-only rows), the measuring set;
    orand B: ``orand_car_a`` rows 540 on (the fold the model never saw);
    forms: 200 generated pages, seed 7 (the pages of ``scripts/score_forms.py``).

A real image is one field of truth: its found fields are read left to right as one string; it is
accepted when every found field is accepted, and its confidence is the product of theirs. A generated
truth field is matched to the found field that overlaps it (IoU >= 0.5); a found field that matches no
truth field but reads digits is a wrong field (it counts against the accepted when accepted).

With ``--write`` the record fitted for ``--model`` is written beside it
(``<model>.calibration.json``). ``--compare`` fits and measures a second model the same way (e.g. an
earlier release) for the accept/error plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from hwr_batch.classify import Classifier, load_classifier
from hwr_batch.confidence import (
    Calibration,
    calibration_path,
    expected_calibration_error,
    fit_calibration,
    reliability_bins,
    review_reasons,
)
from hwr_batch.layout import box_iou
from hwr_batch.mnist import load_mnist
from hwr_batch.read import FileReading, ReadSettings, iter_readings, read_page
from hwr_batch.rows import FieldResult, judge_readings
from hwr_batch.synth import make_form

REPO = Path(__file__).resolve().parent.parent
TARGETS = (0.005, 0.01, 0.02, 0.05)
DANISH_DEV_FROM = 17_000
ORAND_FOLD_B_FROM = 540


@dataclass
class Unit:
    """One thing a person would check: a real image, or a generated truth field (or a stray found field)."""

    set_name: str
    truth: str
    read: str
    evidence: list[np.ndarray]  # the features of each found field it is read from
    confidence: float
    hard: tuple[str, ...]  # reasons other than low_confidence

    @property
    def right(self) -> bool:
        return self.read == self.truth


def result_digits(result: FieldResult, classifier: Classifier) -> str:
    return "".join(classifier.labels[i] for i in result.top.label) if result.top is not None else ""


def hard_reasons(result: FieldResult) -> tuple[str, ...]:
    return tuple(r for r in result.reasons if r != "low_confidence")


# ------------------------------------------------------------------------------------------- reading


def real_rows(folder: Path, start: int = 0, stop: int | None = None) -> list[dict[str, str]]:
    with open(folder / "truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))[start:stop]
    return [r for r in rows if r.get("digits_only", "yes") == "yes"]


CHECKED_LABELS = Path(__file__).with_name("danish_dev_checked.csv")


def checked_rows(rows: list[dict[str, str]], checked: Path = CHECKED_LABELS) -> list[dict[str, str]]:
    """``rows`` with the labels checked by eye put right; rows whose cell is unclear are left out."""
    with open(checked, newline="") as f:
        fixes = {r["image"]: r for r in csv.DictReader(f)}
    out = []
    for r in rows:
        fix = fixes.get(r["image"])
        if fix is None:
            out.append(r)
        elif fix["given"] != r["digits"]:
            raise ValueError(f"{checked}: {r['image']} is labelled {r['digits']!r} in truth.csv, not {fix['given']!r}")
        elif fix["checked"]:
            out.append(r | {"digits": fix["checked"]})
    return out


def read_real(folder: Path, rows: list[dict[str, str]], jobs: int) -> list[tuple[str, FileReading]]:
    paths = [folder / r["image"] for r in rows]
    readings = list(iter_readings(paths, ReadSettings(), jobs=jobs))
    by_path = {r.path: r for r in readings}
    return [(r["digits"], by_path[folder / r["image"]]) for r in rows]


def read_forms(digits, pages: int, seed: int) -> list[tuple[dict, FileReading]]:
    out = []
    for k in range(1, pages + 1):
        rng = np.random.default_rng([seed, k])
        gray, truth = make_form(rng, digits, dpi=int(rng.integers(200, 301)))
        page, images = read_page(gray)
        out.append((truth, FileReading(Path(f"page_{k:04d}"), [page], images)))
    return out


# ------------------------------------------------------------------------------------------- units


def judge(classifier: Classifier, readings: list[FileReading]) -> dict[Path, list[FieldResult]]:
    results: dict[Path, list[FieldResult]] = {}
    for start in range(0, len(readings), 400):  # one model call per 400 files
        for result in judge_readings(readings[start : start + 400], classifier)[0]:
            results.setdefault(result.reading_file.path, []).append(result)
    return results


def real_units(name: str, classifier: Classifier, items: list[tuple[str, FileReading]]) -> list[Unit]:
    judged = judge(classifier, [r for _, r in items])
    units = []
    for truth, reading in items:
        fields = judged.get(reading.path, [])
        units.append(Unit(
            name, truth, "".join(result_digits(f, classifier) for f in fields),
            [f.evidence for f in fields],
            float(np.prod([f.confidence for f in fields])) if fields else 0.0,
            tuple(sorted({r for f in fields for r in hard_reasons(f)})) if fields else ("no_digits",),
        ))
    return units


def form_units(name: str, classifier: Classifier, items: list[tuple[dict, FileReading]]) -> list[Unit]:
    judged = judge(classifier, [r for _, r in items])
    units = []
    for truth, reading in items:
        fields = judged.get(reading.path, [])
        used: set[int] = set()
        for t in truth["fields"]:
            match = [i for i, f in enumerate(fields) if i not in used and box_iou(t["bbox"], f.found.bbox) >= 0.5]
            if not match:
                units.append(Unit(name, t["text"], "", [], 0.0, ("not_found",)))
                continue
            used.add(match[0])
            f = fields[match[0]]
            units.append(Unit(name, t["text"], result_digits(f, classifier), [f.evidence], f.confidence,
                              hard_reasons(f)))
        for i, f in enumerate(fields):
            if i not in used and f.top is not None:  # a field where there is none (printed text, a rule)
                units.append(Unit(name, "", result_digits(f, classifier), [f.evidence], f.confidence,
                                  hard_reasons(f)))
    return units


def recalibrated(units: list[Unit], calibration: Calibration) -> list[Unit]:
    """The units with the confidences ``calibration`` gives (the product over a unit's fields)."""
    out = []
    for u in units:
        confidence = float(np.prod(calibration.confidence(np.stack(u.evidence)))) if u.evidence else 0.0
        out.append(Unit(u.set_name, u.truth, u.read, u.evidence, confidence, u.hard))
    return out


# ------------------------------------------------------------------------------------------- figures


def flag_figures(units: list[Unit], target: float, record: Calibration) -> dict[str, float]:
    threshold = record.threshold(target)
    accepted = np.array([not review_reasons(u.confidence, threshold, list(u.hard)) for u in units])
    right = np.array([u.right for u in units])
    n_acc = int(accepted.sum())
    return {
        "target_error": target, "threshold": threshold, "units": len(units), "accepted": n_acc,
        "accept_rate": n_acc / max(1, len(units)),
        "error_among_accepted": float((~right[accepted]).mean()) if n_acc else 0.0,
        "wrong_flagged": float((~accepted & ~right).sum() / max(1, (~right).sum())),
    }


def curve(units: list[Unit]) -> tuple[np.ndarray, np.ndarray]:
    """(accept rate, error among accepted) as the threshold sweeps, hard flags always flagged."""
    conf = np.array([u.confidence if not u.hard else -1.0 for u in units])
    right = np.array([u.right for u in units])
    order = np.argsort(-conf, kind="stable")
    ok = conf[order] >= 0
    wrong = np.cumsum(~right[order] & ok)
    taken = np.cumsum(ok)
    keep = taken > 0
    return taken[keep] / len(units), wrong[keep] / taken[keep]


def reliability(units: list[Unit], bins: int = 10) -> list[dict[str, float]]:
    return reliability_bins([u.confidence for u in units], [u.right for u in units], bins)


def plot(measured: dict[str, dict[str, list[Unit]]], out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(next(iter(measured.values())).keys())
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6))
    for ax, name in zip(np.atleast_1d(axes), sets):
        for model_name, by_set in measured.items():
            acc, err = curve(by_set[name])
            ax.plot(err * 100, acc * 100, label=model_name)
        for t in TARGETS:
            ax.axvline(t * 100, color="0.85", lw=0.8, zorder=0)
        ax.set_xlim(0, 6)
        ax.set_ylim(0, 100)
        ax.set_xlabel("error among accepted fields (%)")
        ax.set_ylabel("fields accepted (%)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-accept-error.png", dpi=110)
    plt.close(fig)

    shipped = next(iter(measured.values()))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6))
    for ax, name in zip(np.atleast_1d(axes), sets):
        bins = reliability(shipped[name])
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["right"] for b in bins], width=0.09,
               alpha=0.6, label="share right")
        ax.plot([b["confidence"] for b in bins], [b["right"] for b in bins], "o-", ms=3, color="C1",
                label="mean confidence -> share right")
        ece = expected_calibration_error([u.confidence for u in shipped[name]], [u.right for u in shipped[name]])
        ax.set_title(f"{name}: ECE {ece:.3f}")
        ax.set_xlabel("field confidence")
        ax.set_ylabel("share of fields right")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-reliability.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def fit_units(units: list[Unit]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evidence, rightness and acceptability (no hard flag) of the units read from one field."""
    usable = [u for u in units if len(u.evidence) == 1 and "no_digits" not in u.hard]
    return (np.stack([u.evidence[0] for u in usable]), np.array([u.right for u in usable]),
            np.array([not u.hard for u in usable]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "hwr-digits.onnx")
    p.add_argument("--compare", type=Path, help="a second model, fitted and measured the same way")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("HWR_BATCH_REAL_DATA") or REPO.parent / "shared" / "data" / "real"))
    p.add_argument("--mnist", type=Path, default=Path(os.environ.get("HWR_BATCH_MNIST_DIR") or REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--fit-pages", type=int, default=400)
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cheque-model", type=Path,
                   help="a twin of --model trained on orand_car_a rows 540 on instead of 0-539: reads rows 0-539 for the fit")
    p.add_argument("--write", action="store_true", help="write the record beside --model")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--plots", type=Path, help="write the accept/error and reliability PNGs here")
    args = p.parse_args(argv)

    digits = load_mnist("test", args.mnist)
    print("reading the fit sets ...", file=sys.stderr)
    fit_real = {"danish dev": read_real(args.data / "danish_row_numbers_train",
                                        checked_rows(real_rows(args.data / "danish_row_numbers_train", DANISH_DEV_FROM)), args.jobs)}
    fit_forms = {"forms fit": read_forms(digits, args.fit_pages, seed=11)}
    print("reading the measuring sets ...", file=sys.stderr)
    measure_real = {
        "danish": read_real(args.data / "danish_row_numbers", real_rows(args.data / "danish_row_numbers"), args.jobs),
        "orand B": read_real(args.data / "orand_car_a", real_rows(args.data / "orand_car_a", ORAND_FOLD_B_FROM), args.jobs),
    }
    measure_forms = {"forms": read_forms(digits, args.pages, seed=7)}
    cheques = "orand A (cross-fitted)"
    if args.cheque_model:
        fit_real[cheques] = read_real(args.data / "orand_car_a", real_rows(args.data / "orand_car_a", 0, ORAND_FOLD_B_FROM), args.jobs)

    report: dict = {"models": {}}
    measured: dict[str, dict[str, list[Unit]]] = {}
    for model_path in [args.model] + ([args.compare] if args.compare else []):
        classifier = load_classifier(model_path)
        cheque_reader = load_classifier(args.cheque_model) if args.cheque_model and model_path == args.model else classifier
        fit_sets = {n: real_units(n, cheque_reader if n == cheques else classifier, items) for n, items in fit_real.items()}
        fit_sets |= {n: form_units(n, classifier, items) for n, items in fit_forms.items()}
        x, y, acceptable = map(np.concatenate, zip(*(fit_units(u) for u in fit_sets.values())))
        record = fit_calibration(
            x, y, acceptable, model_sha256=classifier.sha256,
            fitted_on={n: len(u) for n, u in fit_sets.items()} | {"fields_fitted": len(y)}
            | ({"cheques read by": cheque_reader.sha256} if cheques in fit_sets else {}),
        )
        sets = {n: recalibrated(real_units(n, classifier, items), record) for n, items in measure_real.items()}
        sets |= {n: recalibrated(form_units(n, classifier, items), record) for n, items in measure_forms.items()}
        figures = {
            n: {"exact": float(np.mean([u.right for u in units])),
                "ece": expected_calibration_error([u.confidence for u in units], [u.right for u in units]),
                "targets": [flag_figures(units, t, record) for t in TARGETS],
                "reliability": reliability(units)}
            for n, units in sets.items()
        }
        record = replace(record, figures={n: {k: f[k] for k in ("exact", "ece", "targets")} for n, f in figures.items()})
        name = f"{model_path.name} ({classifier.sha256[:8]})"
        measured[name] = sets
        report["models"][name] = {"record": asdict(record), "figures": figures}
        print(f"\n{name}: fitted on {record.fitted_on}")
        for n, f in figures.items():
            print(f"  {n:8s} exact {f['exact']:.2%}  ECE {f['ece']:.3f}")
            for t in f["targets"]:
                print(f"    E={t['target_error']:.1%} (confidence >= {t['threshold']:.4f}): accepted {t['accept_rate']:.1%} ({t['accepted']}/{t['units']}), "
                      f"error among accepted {t['error_among_accepted']:.2%}, wrong flagged {t['wrong_flagged']:.1%}")
        if args.write and model_path == args.model:
            record.save(calibration_path(model_path))
            print(f"  wrote {calibration_path(model_path)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float) + "\n")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        plot(measured, args.plots, args.model.stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
