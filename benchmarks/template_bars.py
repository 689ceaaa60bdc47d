"""The bars of issue 13 on generated forms: registration rate, reads equal to the true boxes', refusal of other
layouts, and registration CPU time per 300 dpi page beside the layout stage's on the same pages.

    python benchmarks/template_bars.py [--pages 200] [--others 50] [--out benchmarks/results/template.json]

Copies: rotation within +-5 deg, scale +-5%, shift +-10%, 20% upside down, scanner noise (synth.CopySpec).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from hwr_batch import template as T
from hwr_batch.classify import load_classifier
from hwr_batch.layout import analyse_page, box_iou
from hwr_batch.mnist import load_idx_pair
from hwr_batch.read import FileReading, ReadSettings, read_page
from hwr_batch.rows import classify_readings
from hwr_batch.synth import make_form_copies

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def true_reads(img: np.ndarray, truth: dict, classifier) -> list[str]:
    """What the model reads with the true boxes: the page put back with the generator's own transform."""
    upright = cv2.warpAffine(img, cv2.invertAffineTransform(np.array(truth["transform"])), (2480, 3508), borderValue=255)
    page, images = read_page(upright, dpi=300, settings=ReadSettings(field_mode="boxes"))
    _, rows, _ = classify_readings([FileReading(Path("p"), [page], images)], classifier)
    return [max(rows, key=lambda r: box_iou(b, (r["x"], r["y"], r["width"], r["height"])))["digits"]
            for b in truth["layout_fields"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--others", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/template.json"))
    a = ap.parse_args(argv)
    digits = load_idx_pair(FIXTURES / "mnist-test-300-images-idx3-ubyte.gz", FIXTURES / "mnist-test-300-labels-idx1-ubyte.gz")
    classifier = load_classifier()
    sample, _ = make_form_copies(1, digits, layout_seed=5, seed=0)[0]
    form = T.create_template(sample, dpi=300)
    registered = equal = fields = upside_down = 0
    register_cpu = layout_cpu = 0.0
    for i in range(a.pages):
        img, truth = make_form_copies(1, digits, layout_seed=5, seed=1000 + i)[0]
        upside_down += truth["rotation_deg"] > 90
        started = time.process_time()
        reg = T.register(img, form, dpi=300)
        register_cpu += time.process_time() - started
        started = time.process_time()
        analyse_page(img, mode="boxes", dpi=300)
        layout_cpu += time.process_time() - started
        if not reg.ok:
            continue
        registered += 1
        values, _ = T.read_zones(T.to_template_frame(img, form, reg), form, classifier)
        truth_values = true_reads(img, truth, classifier)
        fields += len(truth_values)
        equal += sum(x == y for x, y in zip(values.values(), truth_values, strict=True))
    refused = 0
    for i in range(a.others):
        img, _ = make_form_copies(1, digits, layout_seed=100 + i, seed=5000 + i)[0]
        refused += T.best_registration(img, [form], dpi=300) is None
    result = {
        "command": "python benchmarks/template_bars.py " + " ".join(argv or sys.argv[1:]),
        "pages": a.pages, "upside_down": upside_down, "registered": registered,
        "fields": fields, "fields_equal_to_true_boxes": equal,
        "other_layouts": a.others, "other_layouts_unregistered": refused,
        "register_cpu_s_per_page": round(register_cpu / a.pages, 4),
        "layout_cpu_s_per_page": round(layout_cpu / a.pages, 4),
        "register_over_layout": round(register_cpu / max(layout_cpu, 1e-9), 3),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if registered == a.pages and equal == fields and refused == a.others else 1


if __name__ == "__main__":
    sys.exit(main())
