#!/usr/bin/env python
"""Score single digits given one small image each, as USPS-style digit files are: through ``hwr-batch process``.

Usage:
    python scripts/score_single.py [--count 2000] [--model PATH] [--data-dir MNIST_DIR] [--out score_single.json]
                                   [--split train]

Takes the first ``--count`` MNIST **test** digits, stretches each one's ink box to fill a square (USPS
digits are scaled to 16x16 without keeping the aspect ratio, so a 1 becomes a wide bar and every digit is
as wide as it is tall), draws it dark on white paper at 64x64 px with an 8 px margin, writes it as a PNG,
runs the real command line over the folder and reads ``fields.csv``. Reports the share of images read as
exactly one digit, and the share read right. A field with one digit must not be cut because its digit is
wide.

``--split train`` takes the first ``--count`` MNIST *training* digits instead: a tuning set for reading
constants, so that the test digits stay a measuring set. The model has trained on most of those digits, so
it reads them more surely than unseen ones: their "read as one digit" (a property of the cuts) is the
figure to tune with, not "read right".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hwr_batch.mnist import load_mnist

REPO = Path(__file__).resolve().parent.parent


def usps_style(image: np.ndarray, size: int = 64, margin: int = 8) -> np.ndarray:
    """An MNIST digit (white on black) stretched to fill a square, dark on white paper."""
    ys, xs = np.nonzero(image > 30)
    crop = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    inner = size - 2 * margin
    stretched = cv2.resize(crop, (inner, inner), interpolation=cv2.INTER_LINEAR)
    page = np.full((size, size), 255, np.uint8)
    page[margin : margin + inner, margin : margin + inner] = 255 - stretched
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("HWR_BATCH_MNIST_DIR") or REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--out", type=Path, default=Path("score_single.json"))
    parser.add_argument("--split", choices=("test", "train"), default="test", help="MNIST split to draw the digits from")
    args = parser.parse_args(argv)
    digits = load_mnist(args.split, args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        scans, out = Path(tmp) / "scans", Path(tmp) / "out"
        scans.mkdir()
        truth = {}
        for i in range(args.count):
            name = f"digit_{i:05d}.png"
            cv2.imwrite(str(scans / name), usps_style(digits.images[i]))
            truth[name] = str(int(digits.labels[i]))
        command = [sys.executable, "-m", "hwr_batch", "-q", "process", str(scans), "--out", str(out)]
        if args.model:
            command += ["--model", str(args.model)]
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
        with open(out / "fields.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    read: dict[str, list[str]] = {}
    for row in rows:
        read.setdefault(Path(row["file"]).name, []).append(row["digits"])
    one = sum(1 for name in truth if len(read.get(name, [])) == 1 and len(read[name][0]) == 1)
    right = sum(1 for name, digit in truth.items() if read.get(name) == [digit])
    report = {"count": args.count, "split": args.split, "model": str(args.model or "shipped"),
              "read_as_one_digit": round(one / args.count, 4), "read_right": round(right / args.count, 4)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
