#!/usr/bin/env python
"""Measure `hwr-batch learn` on real cheque amounts: fine-tune on some fields, read others before and after.

Usage:
    python scripts/score_learn.py --model BASE.onnx [--train 0:500] [--test 540:1040] [--out DIR] [--data DIR]

Writes a corrections CSV (file, page, field, digits) for the ORAND CAR-A rows ``--train`` (row numbers of
its truth.csv), runs the real command line ``hwr-batch learn`` on it starting from ``--model`` (which must
not have been trained on orand_car_a), then reads the rows ``--test`` (never shown to learn) as ``process``
does, with the base model and with the learnt one. Prints and writes (OUT/score_learn.json) both exact
rates and the gain in points.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rows(spec: str) -> slice:
    a, b = spec.split(":")
    return slice(int(a), int(b))


def main(argv: list[str] | None = None) -> int:
    from hwr_batch.classify import load_classifier
    from hwr_batch.learn import Correction, exact_rate, read_corrected_fields

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="base model (.onnx, .keras beside it)")
    parser.add_argument("--train", default="0:500")
    parser.add_argument("--test", default="540:1040")
    parser.add_argument("--out", type=Path, default=Path("runs/score_learn"))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HWR_BATCH_REAL_DATA") or REPO.parent / "shared" / "data" / "real"))
    parser.add_argument("--mnist-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    args = parser.parse_args(argv)
    folder = args.data / "orand_car_a"
    with open(folder / "truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    args.out.mkdir(parents=True, exist_ok=True)
    corrections = args.out / "corrections.csv"
    with open(corrections, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "page", "field", "digits"])
        for row in rows[_rows(args.train)]:
            writer.writerow([str(folder / row["image"]), 1, 1, row["digits"]])
    model_dir = args.out / "model"
    command = [sys.executable, "-m", "hwr_batch", "learn", str(corrections), "--out", str(model_dir),
               "--model", str(args.model), "--mnist-dir", str(args.mnist_dir)]
    print(" ".join(command), flush=True)
    learnt = subprocess.run(command, check=False, capture_output=True, text=True)
    print(learnt.stdout.strip())
    if learnt.returncode != 0:
        print(learnt.stderr[-3000:], file=sys.stderr)
        return learnt.returncode
    test = [Correction(folder / row["image"], 1, 1, row["digits"]) for row in rows[_rows(args.test)]]
    fields = read_corrected_fields(test)
    before = exact_rate(fields, load_classifier(args.model))
    after = exact_rate(fields, load_classifier(model_dir / "hwr-digits.onnx"))
    report = {"base_model": str(args.model), "train_rows": args.train, "test_rows": args.test, "test_fields": len(fields),
              "exact_before": round(before, 4), "exact_after": round(after, 4), "gain_points": round(100 * (after - before), 1),
              "learn_record": json.loads((model_dir / "learn.json").read_text())}
    (args.out / "score_learn.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "learn_record"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
