#!/usr/bin/env python
"""Score the field reader (segment_field_candidates + to_mnist + classify + choose_reading) on real scans.

Usage:
    python scripts/score_real.py --model PATH [--data DIR] [--limit N] [--out scores.json] [--errors misreads.csv]

Data: ``--data``, else ``$HWR_BATCH_REAL_DATA``, else ``../shared/data/real`` next to the repository.
Each set is split in two by row order in its truth.csv: the first half is the tuning half (the method was
tuned on it), the second half is held out. Figures are given for both halves and overall.

Reported per set: string exact match with recognition-driven cuts (``model``: what ships) and with
shape-only cuts (``shape``: :func:`segment_field`); on orand_car_a also per-digit accuracy, two ways:
``aligned`` (each truth box matched to the read digit whose centre lies in it, counted right only if the
labels agree; missing digits count wrong) and ``isolated`` (the ink inside each truth box, padded by 2 px,
run through the segmenter on its own, its biggest uncut unit read: recognition with segmentation taken
out of the picture, as far as the truth boxes allow: they often hold parts of overlapping neighbours).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from hwr_batch.classify import load_classifier, predict_proba, predict_scores
from hwr_batch.normalise import to_mnist
from hwr_batch.segment import read_field, segment_field_candidates

REPO = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """``$HWR_BATCH_REAL_DATA`` or ../shared/data/real relative to the repository root."""
    return Path(os.environ.get("HWR_BATCH_REAL_DATA") or REPO.parent / "shared" / "data" / "real")


def count_rows(folder: Path) -> int:
    """Number of fields in a set's truth.csv (the halves are split on it)."""
    with open(folder / "truth.csv", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def read_rows(folder: Path, limit: int | None) -> list[tuple[int, dict[str, str]]]:
    """(index, row) of truth.csv; with ``limit``, that many rows evenly spread over the whole file."""
    with open(folder / "truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    indexed = list(enumerate(rows))
    if limit and limit < len(indexed):
        picks = np.linspace(0, len(indexed) - 1, limit).round().astype(int)
        indexed = [indexed[i] for i in sorted(set(picks))]
    return indexed


def read_fields(
    folder: Path, rows: list[tuple[int, dict[str, str]]]
) -> tuple[list, list[np.ndarray], float, float]:
    """Segment every field; returns candidates per field, all normalised pieces, wall and CPU seconds spent."""
    cands, images, seconds, cpu = [], [], 0.0, 0.0
    for _, row in rows:
        gray = cv2.imread(str(folder / row["image"]), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise SystemExit(f"cannot read {folder / row['image']}")
        t0, c0 = time.perf_counter(), time.thread_time()
        c = segment_field_candidates(gray)
        images.extend(to_mnist(p.ink) for p in c.pieces)
        seconds += time.perf_counter() - t0
        cpu += time.thread_time() - c0
        cands.append(c)
    return cands, images, seconds, cpu


def classify_all(clf, cands: list, images: list[np.ndarray]) -> tuple[list[np.ndarray], list, float]:
    """One batched model call for all pieces of all fields; per-field digit and reject probabilities, seconds."""
    t0 = time.perf_counter()
    stack = np.stack(images) if images else np.zeros((0, 28, 28), np.float32)
    probs, rejects = predict_scores(clf, stack)
    seconds = time.perf_counter() - t0
    out, out_rejects, start = [], [], 0
    for c in cands:
        out.append(probs[start : start + len(c.pieces)])
        out_rejects.append(rejects[start : start + len(c.pieces)] if clf.rejects else None)
        start += len(c.pieces)
    return out, out_rejects, seconds


def readings(clf, cands: list, probs: list[np.ndarray], rejects: list) -> tuple[list[str], list[str], list[list[int]]]:
    """Model-chosen and shape-only strings per field, and the chosen piece indices."""
    labels = clf.labels
    model_strings, shape_strings, chosen = [], [], []
    for c, p, r in zip(cands, probs, rejects):
        pick = read_field(c, p, r).digits
        chosen.append(pick)
        model_strings.append("".join(labels[int(np.argmax(p[i]))] for i in pick))
        shape_strings.append("".join(labels[int(np.argmax(p[i]))] for i in c.default_reading()))
    return model_strings, shape_strings, chosen


def half_stats(rows, truths, strings_by_method, n_total) -> dict:
    """Exact-match rates for the tuning half, the held-out half and all."""
    result: dict = {}
    for name, pick in (
        ("tuning", lambda i: i < n_total // 2),
        ("held_out", lambda i: i >= n_total // 2),
        ("all", lambda i: True),
    ):
        idx = [k for k, (i, _) in enumerate(rows) if pick(i)]
        entry = {"fields": len(idx)}
        for method, strings in strings_by_method.items():
            entry[method] = round(float(np.mean([strings[k] == truths[k] for k in idx])) if idx else 0.0, 4)
        result[name] = entry
    return result


def orand_digit_accuracy(folder: Path, rows, cands, probs, chosen, clf) -> dict:
    """Per-digit accuracy on orand_car_a: aligned to the read digits, and isolated from the truth boxes."""
    boxes: dict[str, list[tuple[str, int, int, int, int]]] = defaultdict(list)
    with open(folder / "digit_boxes.csv", newline="") as f:
        for b in csv.DictReader(f):
            boxes[b["image"]].append((b["digit"], int(b["x"]), int(b["y"]), int(b["w"]), int(b["h"])))
    n_total = count_rows(folder)
    aligned = {"tuning": [0, 0], "held_out": [0, 0]}
    iso_images, iso_truth, iso_half = [], [], []
    for (i, row), c, p, pick in zip(rows, cands, probs, chosen):
        half = "tuning" if i < n_total // 2 else "held_out"
        gray = cv2.imread(str(folder / row["image"]), cv2.IMREAD_GRAYSCALE)
        read = [(c.pieces[k].bbox, clf.labels[int(np.argmax(p[k]))]) for k in pick]
        for digit, x, y, w, h in boxes[row["image"]]:
            inside = [
                (abs(bx + bw / 2 - (x + w / 2)), lab)
                for (bx, by, bw, bh), lab in read
                if x <= bx + bw / 2 <= x + w
            ]
            ok = bool(inside) and min(inside)[1] == digit
            aligned[half][0] += ok
            aligned[half][1] += 1
            x0, y0 = max(0, x - 2), max(0, y - 2)
            sc = segment_field_candidates(gray[y0 : y + h + 2, x0 : x + w + 2])
            # The uncut units in the box; the one with the most ink is the digit (neighbours' rests are small).
            whole = [sc.pieces[i] for u in sc.units for s, e, i in u.spans if s == 0 and e == u.n_cuts - 1]
            if whole:
                best = max(whole, key=lambda d: float(d.ink.sum()))
                iso_images.append(to_mnist(best.ink))
            else:
                iso_images.append(np.zeros((28, 28), np.float32))
            iso_truth.append(digit)
            iso_half.append(half)
    iso_probs = predict_proba(clf, np.stack(iso_images)) if iso_images else np.zeros((0, 10))
    iso_ok = np.array([clf.labels[int(np.argmax(q))] == t for q, t in zip(iso_probs, iso_truth)])
    halves = np.array(iso_half)
    out = {}
    for half in ("tuning", "held_out"):
        right, total = aligned[half]
        out[half] = {
            "digits": total,
            "aligned": round(right / total, 4) if total else 0.0,
            "isolated": round(float(iso_ok[halves == half].mean()), 4) if total else 0.0,
        }
    right = sum(v[0] for v in aligned.values())
    total = sum(v[1] for v in aligned.values())
    out["all"] = {
        "digits": total,
        "aligned": round(right / max(total, 1), 4),
        "isolated": round(float(iso_ok.mean()), 4) if len(iso_ok) else 0.0,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, type=Path, help="ONNX model")
    parser.add_argument(
        "--data", type=Path, default=None, help="folder with orand_car_a/ and danish_row_numbers/"
    )
    parser.add_argument("--limit", type=int, default=None, help="score only N fields per set, evenly spread")
    parser.add_argument(
        "--out", type=Path, default=Path("score_real.json"), help="JSON report (default score_real.json)"
    )
    parser.add_argument("--errors", type=Path, default=None, help="also write misread fields to this CSV")
    parser.add_argument(
        "--sets", default="orand_car_a,danish_row_numbers", help="comma-separated sets to score"
    )
    args = parser.parse_args(argv)
    data = args.data or default_data_dir()
    if not data.is_dir():
        print(f"no real data at {data}", file=sys.stderr)
        return 2
    clf = load_classifier(args.model)
    report: dict = {
        "model": str(args.model),
        "model_sha256": clf.sha256,
        "data": str(data),
        "limit": args.limit,
        "sets": {},
    }
    errors: list[tuple[str, str, str, str]] = []
    for name in args.sets.split(","):
        folder = data / name
        rows = read_rows(folder, args.limit)
        n_total = count_rows(folder)
        if name == "danish_row_numbers":
            rows = [(i, r) for i, r in rows if r.get("digits_only") == "yes"]
        cands, images, seg_seconds, seg_cpu = read_fields(folder, rows)
        probs, rejects, clf_seconds = classify_all(clf, cands, images)
        model_strings, shape_strings, chosen = readings(clf, cands, probs, rejects)
        truths = [r["digits"] for _, r in rows]
        entry = half_stats(rows, truths, {"model": model_strings, "shape": shape_strings}, n_total)
        entry["timing"] = {
            "fields": len(rows),
            "candidates": len(images),
            "segment_normalise_ms_per_field": round(1000 * seg_seconds / max(len(rows), 1), 3),
            "segment_normalise_cpu_ms_per_field": round(1000 * seg_cpu / max(len(rows), 1), 3),
            "classify_ms_per_field": round(1000 * clf_seconds / max(len(rows), 1), 3),
        }
        if name == "orand_car_a":
            entry["per_digit"] = orand_digit_accuracy(folder, rows, cands, probs, chosen, clf)
        report["sets"][name] = entry
        errors += [(name, r["image"], t, s) for (_, r), t, s in zip(rows, truths, model_strings) if t != s]
        print(f"{name}: {json.dumps(entry)}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.errors:
        with open(args.errors, "w", newline="") as f:
            csv.writer(f).writerows([("set", "image", "truth", "read"), *errors])
    return 0


if __name__ == "__main__":
    sys.exit(main())
