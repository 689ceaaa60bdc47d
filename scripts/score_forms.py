#!/usr/bin/env python
"""Score the form reader on synthetic forms: layout -> segment -> to_mnist -> one batched classify call.

Usage:
    python scripts/score_forms.py [--pages 200] [--seed 7] [--dpi 200-300] [--model PATH] [--cuts shape|model]
    python scripts/score_forms.py --in samples/          # score pages already written by hwr_batch.synth

Pages are generated in memory with :func:`hwr_batch.synth.make_form` from the MNIST **test** set
(``--data-dir``, else ``$HWR_BATCH_MNIST_DIR``, else ``../shared/data/mnist`` beside the repository);
page k uses ``default_rng([seed, k])`` exactly as ``python -m hwr_batch.synth`` does, so
``--seed S --pages N`` here scores the same pages that ``python -m hwr_batch.synth OUT --seed S --pages N``
writes.

Figures:
    digit accuracy: truth digits read right at their position (i-th read digit vs i-th truth digit)
        over all truth digits; digits of fields not found count wrong. One digit too many or too few
        makes every later digit of the field wrong.
    digit accuracy, aligned: 1 - (edit distance between read and truth strings) / truth digits, summed
        over fields (the usual OCR character accuracy: an extra or missing digit costs one).
    field exact-match: truth fields whose read string equals the truth string.
    printed read: found fields that overlap no truth field but do overlap a printed label
        (``extra`` counts every found field that overlaps no truth field).
    layout time: wall and CPU time of ``analyse_page`` per page.

Segmentation: ``--cuts product`` (the default) runs exactly what ``hwr-batch process`` runs
(:func:`hwr_batch.pipeline.read_page`, then :func:`hwr_batch.pipeline.classify_readings`); ``--cuts shape`` uses :func:`hwr_batch.segment.segment_field` (cuts chosen by shape);
``--cuts model`` uses ``segment_field_candidates`` + ``choose_reading`` (cuts chosen by the model).
A minimal local segmenter is used only if hwr_batch/segment.py is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from hwr_batch.classify import load_classifier, predict_proba, top_two
from hwr_batch.evaluate import edit_distance
from hwr_batch.layout import analyse_page, box_iou
from hwr_batch.mnist import load_mnist
from hwr_batch.normalise import to_mnist
from hwr_batch.pipeline import FileReading, classify_readings, read_page
from hwr_batch.synth import FormSpec, make_form

try:
    from hwr_batch.segment import choose_reading, segment_field, segment_field_candidates

    SEGMENTER = "hwr_batch.segment"
except ImportError:  # pragma: no cover - only before segment.py exists
    SEGMENTER = "local fallback"

REPO = Path(__file__).resolve().parent.parent
MODELS = (Path("/work/scratch/full1/hwr-digits.onnx"), Path("/work/scratch/quick/quick.onnx"), REPO / "models" / "hwr-digits.onnx")


def _fallback_segment(gray: np.ndarray) -> list[np.ndarray]:
    """Minimal segmenter: Otsu, connected components, merge horizontal overlaps; returns ink crops."""
    _, ink = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    if n <= 1:
        return []
    hmax = stats[1:, cv2.CC_STAT_HEIGHT].max()
    comps = sorted((i for i in range(1, n) if stats[i, cv2.CC_STAT_HEIGHT] > 0.4 * hmax), key=lambda i: stats[i, 0])
    groups: list[list[int]] = []
    for i in comps:
        x, w = stats[i, 0], stats[i, 2]
        if groups:
            g = groups[-1]
            gx1 = max(stats[j, 0] + stats[j, 2] for j in g)
            if x < gx1 - 0.3 * w:
                g.append(i)
                continue
        groups.append([i])
    out = []
    for g in groups:
        x0 = min(stats[j, 0] for j in g)
        y0 = min(stats[j, 1] for j in g)
        x1 = max(stats[j, 0] + stats[j, 2] for j in g)
        y1 = max(stats[j, 1] + stats[j, 3] for j in g)
        mask = np.isin(labels[y0:y1, x0:x1], g)
        out.append((255 - gray[y0:y1, x0:x1]) * mask)
    return out


def _truth_cuts(field, truth: dict) -> list[np.ndarray]:
    """The ink of each truth digit inside ``field.image`` (only for the truth field it matches)."""
    match = [t for t in truth["fields"] if box_iou(t["bbox"], field.bbox) >= 0.5]
    if not match:
        return []
    inv = cv2.invertAffineTransform(field.to_page)
    paper = float(np.percentile(field.image, 90))
    out = []
    for d in match[0]["digits"]:
        x, y, w, h = d["bbox"]
        pts = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64) @ inv[:, :2].T + inv[:, 2]
        x0, y0 = np.floor(pts.min(axis=0)).astype(int)
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
        crop = field.image[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)].astype(np.float32)
        out.append(np.clip((paper - crop) / max(paper - 30.0, 1.0), 0, 1) * (crop < paper - 40))
    return out


def pages_generated(args) -> Iterator[tuple[str, np.ndarray, dict]]:
    data_dir = args.data_dir or os.environ.get("HWR_BATCH_MNIST_DIR") or REPO.parent / "shared" / "data" / "mnist"
    digits = load_mnist(args.split, Path(data_dir))
    lo, hi = args.dpi
    for k in range(1, args.pages + 1):
        rng = np.random.default_rng([args.seed, k])
        dpi = int(rng.integers(lo, hi + 1)) if lo != hi else lo
        img, truth = make_form(rng, digits, dpi=dpi, spec=FormSpec(style=args.style))
        yield f"page_{k:04d}", img, truth


def pages_from_dir(folder: Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    from hwr_batch.load import iter_pages

    for js in sorted(folder.glob("page_*.json")):
        truth = json.loads(js.read_text())
        ref = truth["files"][0]
        for page in iter_pages(folder / ref["path"], pdf_dpi=truth["dpi"]):
            if page.index == ref["frame"]:
                yield f"{js.stem} ({ref['path']}#{ref['frame']})", page.gray, truth
                break


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dpi", default="200-300", help="300 or a range 200-300")
    p.add_argument("--style", choices=("boxes", "lines"), default="boxes")
    p.add_argument("--in", dest="in_dir", type=Path, help="score pages written by hwr_batch.synth instead")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="MNIST digits to write the pages with: test (the measuring figures) or train (a tuning set "
                   "whose digits the model knows, so that what fails is mostly segmentation)")
    p.add_argument("--model", type=Path)
    p.add_argument("--mode", default="auto", choices=("auto", "boxes", "lines"))
    p.add_argument("--cuts", default="product", choices=("product", "shape", "model", "truth"),
                   help="product: exactly what `hwr-batch process` does (hwr_batch.pipeline.read_page); "
                   "truth: cut each field at the truth digit boxes (an upper bound for segmentation)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime and OpenCV threads")
    p.add_argument("--errors", type=Path, help="write misread fields (JSON lines) here")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    lo, _, hi = args.dpi.partition("-")
    args.dpi = (int(lo), int(hi or lo))
    cv2.setNumThreads(args.threads)
    model = args.model or next((m for m in MODELS if m.is_file()), None)
    if model is None:
        print("no model found; pass --model", file=sys.stderr)
        return 2
    clf = load_classifier(model, threads=args.threads)
    pages = pages_from_dir(args.in_dir) if args.in_dir else pages_generated(args)

    # 1. Layout and segmentation, page by page; keep the digit images for one classify call.
    images: list[np.ndarray] = []
    records = []  # (page name, truth, [(field bbox, candidates-or-None, [image indices])])
    layout_wall, layout_cpu, angle_err = [], [], []
    t_start = time.perf_counter()
    product_readings = {}
    for name, gray, truth in pages:
        if args.cuts == "product":
            page, page_images = read_page(gray)
            product_readings[name] = FileReading(Path(name), [page], page_images)
        w0, c0 = time.perf_counter(), time.process_time()
        lay = analyse_page(gray, mode=args.mode)
        layout_wall.append(time.perf_counter() - w0)
        layout_cpu.append(time.process_time() - c0)
        angle_err.append(abs(lay.angle - truth["skew_deg"]))
        found = []
        for f in lay.fields if args.cuts != "product" else ():
            if args.cuts == "truth":
                crops, cands = _truth_cuts(f, truth), None
            elif SEGMENTER == "local fallback":
                crops, cands = _fallback_segment(f.image), None
            elif args.cuts == "model":
                cands = segment_field_candidates(f.image)
                crops = [c.ink for c in cands.pieces]
            else:
                cands = None
                crops = [c.ink for c in segment_field(f.image)]
            idx = list(range(len(images), len(images) + len(crops)))
            images.extend(to_mnist(c) for c in crops)
            found.append((f.bbox, cands, idx))
        records.append((name, truth, found))
    t_seg = time.perf_counter() - t_start

    # 2. One batched classify call.
    t0 = time.perf_counter()
    probs = predict_proba(clf, np.stack(images)) if images else np.zeros((0, 10), np.float32)
    labels = top_two(probs).label
    t_cls = time.perf_counter() - t0

    if product_readings:
        _, field_rows, _ = classify_readings(list(product_readings.values()), clf)

    # 3. Score.
    n_digits = right = edits = n_fields = exact = extra = printed_read = found_fields = 0
    errors = []
    for name, truth, found in records:
        reads = [((r["x"], r["y"], r["width"], r["height"]), r["digits"]) for r in field_rows if r["file"] == name] if product_readings else []
        for bbox, cands, idx in found:
            if cands is not None:
                chosen = choose_reading(cands, probs[idx]) if idx else []
                text = "".join(clf.labels[labels[idx[i]]] for i in chosen)
            else:
                text = "".join(clf.labels[labels[i]] for i in idx)
            reads.append((bbox, text))
        found_fields += len(reads)
        used = set()
        for tf in truth["fields"]:
            n_fields += 1
            n_digits += len(tf["text"])
            best, best_j = 0.0, -1
            target = tf["bbox"]
            if tf["kind"] == "line" and tf["digits"]:  # a rule's writing zone is loose: match the ink
                bs = np.array([d["bbox"] for d in tf["digits"]])
                x0, y0 = bs[:, :2].min(axis=0)
                x1, y1 = (bs[:, :2] + bs[:, 2:]).max(axis=0)
                target = [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]
            for j, (bbox, _) in enumerate(reads):
                v = box_iou(target, bbox)
                if v > best and j not in used:
                    best, best_j = v, j
            text = ""
            if best >= 0.5:
                used.add(best_j)
                text = reads[best_j][1]
            right += sum(a == b for a, b in zip(text, tf["text"]))
            edits += edit_distance(text, tf["text"])
            exact += text == tf["text"]
            if text != tf["text"]:
                errors.append({"page": name, "kind": tf["kind"], "bbox": tf["bbox"], "truth": tf["text"], "read": text,
                               "iou": round(best, 3)})
        for j, (bbox, text) in enumerate(reads):
            if j in used or any(box_iou(tf["bbox"], bbox) > 0 for tf in truth["fields"]):
                continue
            extra += 1
            if any(box_iou(pb["bbox"], bbox) > 0 for pb in truth["printed"]):
                printed_read += 1
                errors.append({"page": name, "bbox": list(bbox), "truth": None, "read": text, "printed": True})
    n_pages = len(records)
    fig = {
        "pages": n_pages,
        "model": str(model),
        "segmenter": SEGMENTER,
        "cuts": args.cuts,
        "mode": args.mode,
        "truth_fields": n_fields,
        "found_fields": found_fields,
        "truth_digits": n_digits,
        "digit_accuracy": right / max(1, n_digits),
        "digit_accuracy_aligned": 1 - edits / max(1, n_digits),
        "field_exact_match": exact / max(1, n_fields),
        "printed_read": printed_read,
        "extra_fields": extra,
        "layout_ms_per_page_wall": 1000 * float(np.mean(layout_wall)) if layout_wall else 0.0,
        "layout_ms_per_page_cpu": 1000 * float(np.mean(layout_cpu)) if layout_cpu else 0.0,
        "layout_ms_per_page_wall_p95": 1000 * float(np.percentile(layout_wall, 95)) if layout_wall else 0.0,
        "deskew_error_deg_max": float(max(angle_err, default=0.0)),
        "generate_layout_segment_s": round(t_seg, 1),
        "classify_s": round(t_cls, 2),
    }
    for k, v in fig.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))
    if args.errors:
        args.errors.write_text("".join(json.dumps(e) + "\n" for e in errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
