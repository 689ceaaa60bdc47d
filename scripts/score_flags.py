#!/usr/bin/env python
"""How well the review flag separates right from wrong fields on the real scans, run through `process` itself.

Usage:
    python scripts/score_flags.py [--data DIR] [--thresholds 0.8,0.9,0.95,0.99] [--keep DIR]

Runs ``hwr-batch process SET/images -o OUT --per-run`` on each real set (``--data``, else
``$HWR_BATCH_REAL_DATA``, else ``../shared/data/real``), joins ``fields.csv`` to the set's truth by image
(one image is one field; several fields found in one image are read left to right as one string), and
for each threshold prints: the share of fields flagged, the exact-match rate among the fields not
flagged, and the share of misread fields that are flagged. The run uses the default threshold; other
thresholds are applied to the same run's ``min_confidence`` column, keeping the flags raised for other
reasons (wide digit, no digits).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from score_real import default_data_dir  # beside this script

from hwr_batch.config import DEFAULT_MIN_CONFIDENCE


def score_set(folder: Path, out: Path, thresholds: list[float]) -> list[dict[str, float]]:
    subprocess.run(
        [sys.executable, "-m", "hwr_batch", "-q", "process", str(folder / "images"), "-o", str(out), "--per-run"],
        check=True,
        stdout=subprocess.DEVNULL,  # the output paths; errors still reach stderr
    )
    fields = pd.read_csv(next(out.glob("run-*/fields.csv")), dtype={"digits": str})
    fields["image"] = fields["file"].map(lambda f: Path(f).relative_to(folder).as_posix())
    per_image = fields.groupby("image").agg(
        read=("digits", lambda s: "".join(s.fillna(""))), flagged=("flagged", "max"), conf=("min_confidence", "min")
    )
    truth = pd.read_csv(folder / "truth.csv", dtype=str)
    if "digits_only" in truth:
        truth = truth[truth["digits_only"] == "yes"]
    m = truth.merge(per_image, left_on="image", right_index=True, how="left")
    m["flagged"] = m["flagged"].fillna(True).astype(bool)  # nothing found: flagged
    m["conf"] = m["conf"].fillna(0.0)
    right = m["digits"] == m["read"]
    other = m["flagged"] & (m["conf"] >= DEFAULT_MIN_CONFIDENCE)
    rows = []
    for t in thresholds:
        flagged = other | (m["conf"] < t)
        rows.append({
            "threshold": t,
            "fields": len(m),
            "exact": float(right.mean()),
            "flagged": float(flagged.mean()),
            "right_among_unflagged": float(right[~flagged].mean()),
            "misreads_flagged": float((flagged & ~right).sum() / max(1, (~right).sum())),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--thresholds", default="0.8,0.9,0.95,0.99")
    p.add_argument("--keep", type=Path, help="write the runs' outputs here instead of a temporary folder")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for name in ("orand_car_a", "danish_row_numbers"):
            folder = args.data / name
            if not (folder / "truth.csv").is_file():
                print(f"{name}: no truth.csv under {folder}; skipped", file=sys.stderr)
                continue
            for r in score_set(folder, base / name, thresholds):
                print(f"{name:20s} threshold {r['threshold']:.2f}: exact {r['exact']:.1%}, flagged {r['flagged']:.0%}, "
                      f"right among the rest {r['right_among_unflagged']:.0%}, misreads flagged {r['misreads_flagged']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
