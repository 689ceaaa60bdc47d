"""Synthetic scanned forms: printed boxes and labels, handwritten MNIST test digits, scanner artefacts.

Used for tests, samples and benchmarks. A page is an A4 sheet at a chosen dpi with a printed title,
printed labels (some containing printed digits such as a form number or page numbers, which must
*not* be read), horizontal rules and fields holding 1-10 handwritten digits. Each handwritten digit
is a real MNIST **test-set** image, cropped to its ink, scaled to 5-8 mm and drawn dark with its
MNIST intensity as alpha. The page is then "scanned": skewed, blurred, unevenly lit and given noise.

The ground truth (a JSON-able dict) gives every coordinate in the final (skewed) page pixels.
Angles follow OpenCV's convention: ``skew_deg`` > 0 means the content was rotated
counter-clockwise on screen (``cv2.getRotationMatrix2D(centre, skew_deg, 1)``); rotating by
``-skew_deg`` straightens it.

Command line::

    python -m hwr_batch.synth OUT_DIR --pages 10 --seed 1 [--dpi 300 | --dpi 200-300] [--format png jpg ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .mnist import DATA_DIR_ENV, LabelledImages, load_mnist

MM_PER_INCH = 25.4
A4_MM = (210.0, 297.0)
FORMATS = ("png", "jpg", "tif", "tif-g4", "tif-multi", "tif-g4-multi", "pdf")

_TITLES = (
    "ORDER FORM", "DELIVERY NOTE", "CLAIM FORM", "REGISTRATION", "STOCK RETURN", "PAYMENT SLIP",
    "METER READING", "SURVEY 2024", "TIME SHEET",
)
_LABELS = (
    "Customer no.", "Amount", "Date", "Account", "Invoice no.", "Qty", "Postcode", "Phone",
    "Order no.", "Item code", "Meter", "Hours", "Total", "Ref.", "Member ID", "Year", "Units",
    "Branch", "Line 3", "Code (6)", "Box 12", "Price EUR", "Weight kg", "Pin",
)
_NOTES = (
    "Please write one digit per box, in black ink.", "Office use only: ref 4471/23",
    "Tel. 0800 123 456", "See note 2 overleaf", "Keep a copy for 12 months.",
    "Section {n}: details", "{n}. Payment", "Return by 31.12.2025",
)
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)


@dataclass(frozen=True)
class ScanSpec:
    """How the page is "scanned". Ranges are (low, high), drawn uniformly per page.

    Attributes:
        max_skew_deg: skew drawn from [-max, max].
        blur_sigma: Gaussian blur sigma in px at 300 dpi (scaled with dpi).
        noise_sigma: additive Gaussian noise, in gray levels.
        shading: how much darker the darkest corner gets (uneven illumination / vignetting).
        paper: paper gray level before shading.
    """

    max_skew_deg: float = 3.0
    blur_sigma: tuple[float, float] = (0.4, 1.1)
    noise_sigma: tuple[float, float] = (2.0, 7.0)
    shading: tuple[float, float] = (0.03, 0.22)
    paper: tuple[int, int] = (238, 252)


CLEAN_SCAN = ScanSpec(max_skew_deg=0.0, blur_sigma=(0.0, 0.0), noise_sigma=(0.0, 0.0), shading=(0.0, 0.0), paper=(255, 255))


@dataclass(frozen=True)
class FormSpec:
    """What goes on a form.

    Attributes:
        style: ``"boxes"`` (every field a rectangle or comb) or ``"lines"`` (digits written on rules, no boxes).
        digit_height_mm: handwritten digit height range.
        min_digits, max_digits: digits per field.
        comb_prob: chance a field is a comb (box split into cells) rather than a plain box.
        touch_prob: chance that a gap between neighbours is negative (digits touch / overlap).
        cross_prob: chance per field that one digit crosses the box's top or bottom line.
        max_fields: upper bound of fields per page.
    """

    style: str = "boxes"
    digit_height_mm: tuple[float, float] = (5.0, 8.0)
    min_digits: int = 1
    max_digits: int = 10
    comb_prob: float = 0.35
    touch_prob: float = 0.05
    cross_prob: float = 0.2
    max_fields: int = 14


# --------------------------------------------------------------------------------------- drawing


class _Page:
    """A white page being drawn on, in unskewed pixel coordinates, and what was drawn."""

    def __init__(self, width: int, height: int, dpi: int) -> None:
        self.img = np.full((height, width), 255, np.uint8)
        self.dpi = dpi
        self.px_mm = dpi / MM_PER_INCH
        self.printed: list[dict[str, Any]] = []
        self.fields: list[dict[str, Any]] = []
        self.rules: list[list[int]] = []

    def mm(self, v: float) -> int:
        return round(v * self.px_mm)

    def text(self, s: str, x: int, y_top: int, cap_mm: float, font: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Print ``s`` with its cap top at ``y_top``; return its ink box (x, y, w, h)."""
        cap_px = cap_mm * self.px_mm
        (_, h1), _ = cv2.getTextSize("H", font, 1.0, 1)
        scale = cap_px / h1
        thick = max(1, round(cap_px * rng.uniform(0.07, 0.11)))
        (tw, th), base = cv2.getTextSize(s, font, scale, thick)
        org = (x, y_top + th)
        cv2.putText(self.img, s, org, font, scale, 0, thick, cv2.LINE_AA)
        box = (x - thick, y_top - thick, tw + 2 * thick, th + base + 2 * thick)
        self.printed.append({"text": s, "bbox": list(box)})
        return box

    def rule(self, x0: int, x1: int, y: int, thick: int) -> None:
        cv2.line(self.img, (x0, y), (x1, y), 0, thick)
        self.rules.append([x0, y - thick // 2, x1 - x0, thick])


def _digit_ink(digits: LabelledImages, index: int) -> np.ndarray:
    """MNIST image cropped to its ink, float32 alpha in [0, 1]."""
    img = digits.images[index]
    rows = np.flatnonzero(img.max(axis=1) > 40)
    cols = np.flatnonzero(img.max(axis=0) > 40)
    if rows.size == 0:
        return np.zeros((1, 1), np.float32)
    return img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255.0


def _scaled_digit(ink: np.ndarray, height: int) -> np.ndarray:
    """Scale a cropped MNIST digit to ``height`` px and sharpen it a little, like a pen stroke."""
    h, w = ink.shape
    width = max(2, round(w * height / h))
    big = cv2.resize(ink, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip((big - 0.12) * 1.6, 0.0, 1.0)


def _draw_digit(page: _Page, alpha: np.ndarray, x: int, y: int, ink: float) -> list[int] | None:
    """Blend ``alpha`` at (x, y) with gray ``ink``; return the drawn ink's box (x, y, w, h)."""
    H, W = page.img.shape
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return None
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x]
    region = page.img[y0:y1, x0:x1]
    blended = region * (1.0 - a) + ink * a
    page.img[y0:y1, x0:x1] = np.minimum(region, blended).astype(np.uint8)
    rows = np.flatnonzero(a.max(axis=1) > 0.3)
    cols = np.flatnonzero(a.max(axis=0) > 0.3)
    if rows.size == 0:
        return None
    return [x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _write_digits(
    page: _Page,
    rng: np.random.Generator,
    digits: LabelledImages,
    n: int,
    height: int,
    place: Any,
) -> list[dict[str, Any]]:
    """Draw ``n`` random MNIST digits; ``place(i, alpha) -> (x, y)`` positions each one."""
    ink_gray = float(rng.uniform(0, 80))
    out = []
    for i in range(n):
        idx = int(rng.integers(len(digits)))
        h = max(8, round(height * rng.uniform(0.9, 1.1)))
        alpha = _scaled_digit(_digit_ink(digits, idx), h)
        x, y = place(i, alpha)
        box = _draw_digit(page, alpha, x, y, ink_gray)
        if box is not None:
            out.append({"label": int(digits.labels[idx]), "bbox": box, "mnist_index": idx})
    return out


def _field_plain(page: _Page, rng: np.random.Generator, digits: LabelledImages, spec: FormSpec,
                 x: int, y: int, n: int, dh: int, max_w: int) -> tuple[int, int] | None:
    """A plain rectangle with ``n`` digits written left to right; returns (w, h) or None if it won't fit."""
    thick = max(2, page.mm(rng.uniform(0.18, 0.35)))
    box_h = int(dh * rng.uniform(1.35, 1.7))
    # Pre-draw the digits off-page to know their widths, then size the box to fit.
    idxs = rng.integers(len(digits), size=n)
    sizes = [max(8, round(dh * rng.uniform(0.9, 1.1))) for _ in range(n)]
    alphas = [_scaled_digit(_digit_ink(digits, int(i)), s) for i, s in zip(idxs, sizes)]
    gaps = [dh * (rng.uniform(-0.06, 0.0) if rng.random() < spec.touch_prob else rng.uniform(0.1, 0.4)) for _ in range(n)]
    pad_l = int(dh * rng.uniform(0.2, 0.7))
    pad_r = int(dh * rng.uniform(0.2, 2.5))
    widths = [a.shape[1] for a in alphas]
    box_w = max(pad_l + sum(widths) + int(sum(gaps[1:])) + pad_r, int(dh * rng.uniform(1.0, 1.3)))
    if box_w > max_w:
        return None
    cross = rng.random() < spec.cross_prob
    cross_i = int(rng.integers(n))
    ink = float(rng.uniform(0, 80))
    cv2.rectangle(page.img, (x, y), (x + box_w, y + box_h), 0, thick)
    cx = x + pad_l
    drawn = []
    for i, a in enumerate(alphas):
        if i:
            cx += int(gaps[i])
        free = box_h - a.shape[0]
        top = y + free // 2 + int(rng.uniform(-0.06, 0.06) * dh)
        if cross and i == cross_i:  # dip through the bottom line or poke through the top one
            over = int(a.shape[0] * rng.uniform(0.04, 0.16))
            top = y + box_h - a.shape[0] + over if rng.random() < 0.6 else y - over
        box = _draw_digit(page, a, cx, top, ink)
        if box is not None:
            drawn.append({"label": int(digits.labels[int(idxs[i])]), "bbox": box, "mnist_index": int(idxs[i])})
        cx += a.shape[1]
    page.fields.append({"kind": "box", "bbox": [x - thick // 2, y - thick // 2, box_w + thick, box_h + thick],
                        "cells": 1, "digits": drawn})
    return box_w, box_h


def _field_comb(page: _Page, rng: np.random.Generator, digits: LabelledImages, spec: FormSpec,
                x: int, y: int, n: int, dh: int, max_w: int) -> tuple[int, int] | None:
    """A comb: a rectangle split into cells by separators or ticks; one digit per cell, left-aligned."""
    thick = max(2, page.mm(rng.uniform(0.18, 0.35)))
    cells = n + int(rng.integers(0, 3))
    cw = int(dh * rng.uniform(0.9, 1.15))
    box_h = int(dh * rng.uniform(1.3, 1.6))
    box_w = cells * cw
    if box_w > max_w:
        return None
    full = rng.random() < 0.5
    tick = box_h if full else int(box_h * rng.uniform(0.22, 0.4))
    cv2.rectangle(page.img, (x, y), (x + box_w, y + box_h), 0, thick)
    for c in range(1, cells):
        cv2.line(page.img, (x + c * cw, y + box_h - tick), (x + c * cw, y + box_h), 0, thick)
    cross = rng.random() < spec.cross_prob
    cross_i = int(rng.integers(n))

    ink = float(rng.uniform(0, 80))
    dh_c = int(dh * rng.uniform(0.85, 1.0))
    drawn = []
    for i in range(n):
        idx = int(rng.integers(len(digits)))
        src = _digit_ink(digits, idx)
        h = max(8, round(dh_c * rng.uniform(0.9, 1.1)))
        # Writers shrink a wide digit to fit its cell (mostly).
        h = min(h, max(8, int(h * 0.95 * cw / max(1.0, src.shape[1] * h / src.shape[0]))))
        a = _scaled_digit(src, h)
        hh, w = a.shape
        px = x + i * cw + (cw - w) // 2 + int(rng.uniform(-0.08, 0.08) * cw)
        py = y + (box_h - hh) // 2 + int(rng.uniform(-0.05, 0.05) * hh)
        if cross and i == cross_i:
            over = int(hh * rng.uniform(0.04, 0.15))
            py = y + box_h - hh + over if rng.random() < 0.6 else y - over
        box = _draw_digit(page, a, px, py, ink)
        if box is not None:
            drawn.append({"label": int(digits.labels[idx]), "bbox": box, "mnist_index": idx})
    page.fields.append({"kind": "comb", "bbox": [x - thick // 2, y - thick // 2, box_w + thick, box_h + thick],
                        "cells": cells, "digits": drawn})
    return box_w, box_h


def _field_line(page: _Page, rng: np.random.Generator, digits: LabelledImages, spec: FormSpec,
                x: int, y: int, n: int, dh: int, max_w: int) -> tuple[int, int] | None:
    """Digits written on a printed rule (no box); the field's box is the writing zone above the rule."""
    thick = max(2, page.mm(rng.uniform(0.15, 0.3)))
    zone_h = int(dh * 1.4)
    widths_est = int(n * dh * 0.75)
    line_w = widths_est + int(dh * rng.uniform(1.0, 3.0))
    if line_w > max_w:
        return None
    y_line = y + zone_h
    cursor = [x + int(dh * rng.uniform(0.1, 0.5))]

    def place(i: int, a: np.ndarray) -> tuple[int, int]:
        h, w = a.shape
        if i:
            gap = dh * (rng.uniform(-0.06, 0.0) if rng.random() < spec.touch_prob else rng.uniform(0.1, 0.4))
            cursor[0] += int(gap)
        px = cursor[0]
        cursor[0] += w
        py = y_line - h - int(dh * rng.uniform(0.02, 0.15))
        return px, py

    drawn = _write_digits(page, rng, digits, n, dh, place)
    line_w = max(line_w, cursor[0] - x + int(dh * 0.3))
    # Went too long: let it run (real writers overrun too), but keep the rule on the page.
    line_w = min(line_w, max_w)
    page.rule(x, x + line_w, y_line, thick)
    page.rules.pop()  # the rule is the field's, not a separator
    page.fields.append({"kind": "line", "bbox": [x, y, line_w, zone_h + thick], "cells": 1, "digits": drawn})
    return line_w, zone_h


# --------------------------------------------------------------------------------------- the form


def _layout_form(page: _Page, rng: np.random.Generator, digits: LabelledImages, spec: FormSpec) -> None:
    """Draw title, labels, rules and fields onto ``page``."""
    H, W = page.img.shape
    font = _FONTS[int(rng.integers(len(_FONTS)))]
    left, right = page.mm(rng.uniform(14, 22)), W - page.mm(rng.uniform(14, 22))
    y = page.mm(rng.uniform(12, 20))
    title = page.text(_TITLES[int(rng.integers(len(_TITLES)))], left, y, rng.uniform(5.5, 7.5), font, rng)
    form_no = f"Form {int(rng.integers(2, 99))}-{'ABCDEFGH'[int(rng.integers(8))]}"
    (fw, _), _ = cv2.getTextSize(form_no, font, 1.0, 1)
    cap = rng.uniform(3.0, 4.0)
    (_hw, hh), _ = cv2.getTextSize("H", font, 1.0, 1)
    page.text(form_no, right - int(fw * cap * page.px_mm / hh) - page.mm(2), y, cap, font, rng)
    y = title[1] + title[3] + page.mm(rng.uniform(3, 6))
    page.rule(left, right, y, max(2, page.mm(0.4)))
    y += page.mm(rng.uniform(8, 12))
    bottom = H - page.mm(28)
    makers = {"boxes": (_field_plain, _field_comb), "lines": (_field_line, _field_line)}[spec.style]
    section = 1
    while y < bottom and len(page.fields) < spec.max_fields:
        r = rng.random()
        if r < 0.12:  # a section rule with a numbered heading
            page.rule(left, right, y, max(2, page.mm(0.3)))
            section += 1
            y += page.mm(3)
            page.text(f"{section}. " + ("Details", "Payment", "Delivery", "Items")[int(rng.integers(4))], left, y,
                      rng.uniform(3.5, 4.5), font, rng)
            y += page.mm(rng.uniform(9, 13))
            continue
        if r < 0.2:  # a printed note, often with digits in it
            note = _NOTES[int(rng.integers(len(_NOTES)))].format(n=int(rng.integers(2, 9)))
            page.text(note, left, y, rng.uniform(2.5, 3.5), font, rng)
            y += page.mm(rng.uniform(8, 11))
            continue
        # A row of one or two fields, each with its label to the left or above.
        row_h = 0
        x = left
        label_above = rng.random() < 0.3
        for _ in range(1 + int(rng.random() < 0.4)):
            dh = page.mm(rng.uniform(*spec.digit_height_mm))
            label = _LABELS[int(rng.integers(len(_LABELS)))]
            lcap = rng.uniform(2.6, 3.6)
            fy = y
            if label_above:
                lb = page.text(label, x, y, lcap, font, rng)
                fy = lb[1] + lb[3] + page.mm(rng.uniform(3.5, 5))
                fx = x
            else:
                lb_w = int(cv2.getTextSize(label, font, lcap * page.px_mm / hh, 1)[0][0])
                fx = x + max(lb_w + page.mm(6), page.mm(rng.uniform(35, 50)))
            if y + (fy - y) + dh * 2 > bottom or fx > right - page.mm(20):
                break
            n = int(rng.integers(spec.min_digits, spec.max_digits + 1))
            maker = makers[int(rng.random() < spec.comb_prob)]
            size = None
            while size is None and n >= spec.min_digits:
                size = maker(page, rng, digits, spec, fx, fy, n, dh, right - fx)
                n -= 1
            if size is None:
                if label_above:
                    page.printed.pop()
                    page.img[lb[1] - 2 : lb[1] + lb[3] + 2, lb[0] - 2 : lb[0] + lb[2] + 2] = 255
                break
            if not label_above:
                page.text(label, x, fy + size[1] // 2 - int(lcap * page.px_mm / 2), lcap, font, rng)
            row_h = max(row_h, fy - y + size[1])
            x = fx + size[0] + page.mm(rng.uniform(10, 20))
            if x > right - page.mm(60):
                break
        y += max(row_h, page.mm(8)) + page.mm(rng.uniform(7, 14))
    page.text(f"Page {int(rng.integers(1, 4))} of {int(rng.integers(4, 9))}", left, H - page.mm(16), 3.0, font, rng)
    page.text(f"Rev. {int(rng.integers(2015, 2026))}-{int(rng.integers(1, 13)):02d}", right - page.mm(40),
              H - page.mm(16), 2.8, font, rng)


def _transform_box(box: Sequence[int], m: np.ndarray, size: tuple[int, int]) -> tuple[list[int], list[list[float]]]:
    """Map an (x, y, w, h) box through affine ``m``; return its axis-aligned box (clipped) and its 4 corners."""
    x, y, w, h = box
    pts = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)
    out = pts @ m[:, :2].T + m[:, 2]
    W, H = size
    x0, y0 = np.clip(out.min(axis=0), 0, [W, H])
    x1, y1 = np.clip(out.max(axis=0), 0, [W, H])
    return [math.floor(x0), math.floor(y0), math.ceil(x1 - x0), math.ceil(y1 - y0)], out.round(1).tolist()


def _scan(img: np.ndarray, rng: np.random.Generator, scan: ScanSpec, dpi: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Skew, blur, shade and add noise; return the scanned page and the 2x3 skew matrix used."""
    H, W = img.shape
    m = cv2.getRotationMatrix2D((W / 2.0, H / 2.0), angle, 1.0)
    if angle:
        img = cv2.warpAffine(img, m, (W, H), flags=cv2.INTER_LINEAR, borderValue=255)
    sigma = rng.uniform(*scan.blur_sigma) * dpi / 300.0
    if sigma > 0.1:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    paper = rng.uniform(*scan.paper) / 255.0
    shade = rng.uniform(*scan.shading)
    noise = rng.uniform(*scan.noise_sigma)
    if shade <= 0 and noise <= 0 and paper >= 1.0:
        return img, m
    # Illumination: a linear gradient plus vignetting, made small and resized up (cheap).
    gh, gw = 24, 17
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    yy, xx = yy / (gh - 1) - 0.5, xx / (gw - 1) - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(theta) * xx + np.sin(theta) * yy + 0.71) / 1.42
    vign = (xx**2 + yy**2) / 0.5
    mix = rng.uniform(0.3, 0.8)
    light = paper * (1.0 - shade * (mix * grad + (1 - mix) * vign))
    light = cv2.resize(light.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    out = img.astype(np.float32)
    out *= light
    if noise > 0:
        tile = rng.standard_normal((512, 512), dtype=np.float32) * noise
        reps = (H // 512 + 1, W // 512 + 1)
        out += np.tile(tile, reps)[:H, :W]
    return np.clip(out, 0, 255, out=out).astype(np.uint8), m


def make_form(
    rng: np.random.Generator,
    digits: LabelledImages,
    *,
    dpi: int = 300,
    spec: FormSpec = FormSpec(),
    scan: ScanSpec = ScanSpec(),
    skew_deg: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one scanned form.

    Args:
        rng: the only source of randomness (same state -> same page).
        digits: handwriting to use, e.g. ``load_mnist("test", data_dir)`` or a small fixture.
        dpi: resolution of the A4 page (200-300 is realistic).
        spec: what goes on the form.
        scan: scanner artefacts; :data:`CLEAN_SCAN` for none.
        skew_deg: force this skew (else drawn from ``scan.max_skew_deg``).

    Returns:
        (image, truth): (H, W) uint8 dark on light, and a JSON-able dict: ``width``, ``height``,
        ``dpi``, ``skew_deg``, ``fields`` (reading order; each ``kind`` box|comb|line, ``bbox``
        (x, y, w, h) axis-aligned in page pixels, ``corners``, ``cells``, ``text``, ``digits``: each
        ``label``, ``bbox``, ``mnist_index``) and ``printed`` (each ``text``, ``bbox``, ``corners``).
    """
    W, H = round(A4_MM[0] / MM_PER_INCH * dpi), round(A4_MM[1] / MM_PER_INCH * dpi)
    page = _Page(W, H, dpi)
    _layout_form(page, rng, digits, spec)
    angle = float(rng.uniform(-scan.max_skew_deg, scan.max_skew_deg)) if skew_deg is None else float(skew_deg)
    img, m = _scan(page.img, rng, scan, dpi, angle)
    fields = []
    for f in page.fields:
        bbox, corners = _transform_box(f["bbox"], m, (W, H))
        ds = [{**d, "bbox": _transform_box(d["bbox"], m, (W, H))[0]} for d in f["digits"]]
        fields.append({"kind": f["kind"], "bbox": bbox, "corners": corners, "cells": f["cells"],
                       "text": "".join(str(d["label"]) for d in ds), "digits": ds})
    printed = []
    for p in page.printed:
        bbox, corners = _transform_box(p["bbox"], m, (W, H))
        printed.append({"text": p["text"], "bbox": bbox, "corners": corners})
    truth = {
        "width": W, "height": H, "dpi": dpi, "skew_deg": round(angle, 4), "style": spec.style,
        "fields": fields, "printed": printed,
        "rules": [_transform_box(r, m, (W, H))[0] for r in page.rules],
    }
    return img, truth


@dataclass(frozen=True)
class CopySpec:
    """How far the filled copies of one layout stray from it (drawn uniformly per copy).

    Attributes:
        max_rotation_deg: rotation in [-max, max] degrees.
        max_scale: scale in [1 - max, 1 + max].
        max_shift: shift in [-max, max] times the page's width (x) and height (y).
        upside_down_prob: chance the copy is also turned by 180 degrees.
        margin: the scan is this much larger than the paper on every side, as a scanner bed is,
            so that a shifted page is not cut off.
    """

    max_rotation_deg: float = 5.0
    max_scale: float = 0.05
    max_shift: float = 0.10
    upside_down_prob: float = 0.2
    margin: float = 0.12


def make_form_copies(
    n: int,
    digits: LabelledImages,
    *,
    layout_seed: int = 0,
    seed: int = 1,
    dpi: int = 300,
    spec: FormSpec = FormSpec(),
    scan: ScanSpec = ScanSpec(max_skew_deg=0.0),
    copy: CopySpec = CopySpec(),
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """``n`` scanned copies of ONE filled form (that of ``layout_seed``), each placed anew.

    Box widths follow the digits' ink, so every copy carries the same handwriting (other digits would
    make another layout). Each copy is rotated, scaled and shifted within ``copy``, sometimes
    turned upside down, and scanned (blur, shading, noise); the truth is in the copy's pixels, as
    :func:`make_form`'s, plus ``transform`` (the 2x3 affine from the layout's page to the copy).
    """
    rng = np.random.default_rng(seed)
    W, H = round(A4_MM[0] / MM_PER_INCH * dpi), round(A4_MM[1] / MM_PER_INCH * dpi)
    out_w, out_h = round(W * (1 + 2 * copy.margin)), round(H * (1 + 2 * copy.margin))
    page = _Page(W, H, dpi)
    _layout_form(page, np.random.default_rng(layout_seed), digits, spec)
    copies = []
    for _ in range(n):
        angle = float(rng.uniform(-copy.max_rotation_deg, copy.max_rotation_deg))
        if rng.random() < copy.upside_down_prob:
            angle += 180.0
        scale = float(rng.uniform(1 - copy.max_scale, 1 + copy.max_scale))
        dx, dy = rng.uniform(-copy.max_shift, copy.max_shift, 2) * (W, H)
        m = cv2.getRotationMatrix2D((W / 2.0, H / 2.0), angle, scale)
        m[:, 2] += (out_w - W) / 2.0 + dx, (out_h - H) / 2.0 + dy
        img = cv2.warpAffine(page.img, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderValue=255)
        img, _ = _scan(img, rng, scan, dpi, 0.0)
        fields = []
        for f in page.fields:
            bbox, corners = _transform_box(f["bbox"], m, (out_w, out_h))
            fields.append({"kind": f["kind"], "bbox": bbox, "corners": corners, "cells": f["cells"],
                           "text": "".join(str(d["label"]) for d in f["digits"])})
        truth = {"width": out_w, "height": out_h, "dpi": dpi, "rotation_deg": round(angle, 4), "scale": scale,
                 "transform": m.tolist(), "fields": fields, "layout_fields": [f["bbox"] for f in page.fields]}
        copies.append((img, truth))
    return copies


# --------------------------------------------------------------------------------------- files


def _digits_from(data_dir: Path | str | None, digits: LabelledImages | None) -> LabelledImages:
    if digits is not None:
        return digits
    return load_mnist("test", Path(data_dir) if data_dir else None)


def _save_g4(img: np.ndarray, path: Path, dpi: int) -> None:
    from PIL import Image

    _, bw = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    Image.fromarray(bw).convert("1").save(path, compression="group4", dpi=(dpi, dpi))


def write_forms(
    out_dir: Path | str,
    n: int,
    *,
    seed: int = 0,
    data_dir: Path | str | None = None,
    digits: LabelledImages | None = None,
    formats: Sequence[str] = ("png",),
    dpi: int | tuple[int, int] = 300,
    spec: FormSpec = FormSpec(),
    scan: ScanSpec = ScanSpec(),
    jpeg_quality: tuple[int, int] = (70, 92),
    start: int = 1,
) -> list[Path]:
    """Generate ``n`` pages into ``out_dir``, each with ``page_NNNN.json`` beside it.

    Formats: ``png``, ``jpg``, ``tif`` (8-bit LZW, one file per page), ``tif-g4`` (1-bit CCITT G4,
    Otsu-binarised, one file per page), ``tif-multi`` (all pages in one multi-page LZW ``pages.tif``),
    ``tif-g4-multi`` (all pages in one multi-page 1-bit G4 ``pages_g4.tif``),
    ``pdf`` (all pages in one ``pages.pdf``, via Pillow). Each JSON's ``files`` lists where its page
    went (``path`` relative to ``out_dir``, and ``frame``: the page's index in a multi-page file).

    Page ``i`` uses ``np.random.default_rng([seed, i])``, so pages are reproducible one by one.

    Returns:
        The image files written (multi-page files once).
    """
    from PIL import Image

    bad = set(formats) - set(FORMATS)
    if bad:
        raise ValueError(f"unknown format(s) {sorted(bad)}; choose from {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = _digits_from(data_dir, digits)
    written: list[Path] = []
    multi: dict[str, list[Image.Image]] = {"tif-multi": [], "tif-g4-multi": [], "pdf": []}
    multi_names = {"tif-multi": "pages.tif", "tif-g4-multi": "pages_g4.tif", "pdf": "pages.pdf"}
    multi_dpi = 300
    for k in range(start, start + n):
        rng = np.random.default_rng([seed, k])
        page_dpi = dpi if isinstance(dpi, int) else int(rng.integers(dpi[0], dpi[1] + 1))
        img, truth = make_form(rng, digits, dpi=page_dpi, spec=spec, scan=scan)
        stem = f"page_{k:04d}"
        truth["seed"] = [seed, k]
        truth["files"] = []
        for fmt in formats:
            if fmt == "png":
                path = out / f"{stem}.png"
                cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 6])
            elif fmt == "jpg":
                q = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
                path = out / f"{stem}.jpg"
                Image.fromarray(img).save(path, quality=q, dpi=(page_dpi, page_dpi))
                truth["jpeg_quality"] = q
            elif fmt == "tif":
                path = out / f"{stem}.tif"
                Image.fromarray(img).save(path, compression="tiff_lzw", dpi=(page_dpi, page_dpi))
            elif fmt == "tif-g4":
                path = out / f"{stem}_g4.tif"
                _save_g4(img, path, page_dpi)
            else:
                if fmt == "tif-g4-multi":
                    _, bw = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
                    multi[fmt].append(Image.fromarray(bw).convert("1"))
                else:
                    multi[fmt].append(Image.fromarray(img))
                multi_dpi = page_dpi
                truth["files"].append({"path": multi_names[fmt], "frame": len(multi[fmt]) - 1})
                continue
            written.append(path)
            truth["files"].append({"path": path.name, "frame": 0})
        (out / f"{stem}.json").write_text(json.dumps(truth, indent=1))
    if multi["tif-multi"]:
        path = out / "pages.tif"
        first, *rest = multi["tif-multi"]
        first.save(path, save_all=True, append_images=rest, compression="tiff_lzw", dpi=(multi_dpi, multi_dpi))
        written.append(path)
    if multi["tif-g4-multi"]:
        path = out / "pages_g4.tif"
        first, *rest = multi["tif-g4-multi"]
        first.save(path, save_all=True, append_images=rest, compression="group4", dpi=(multi_dpi, multi_dpi))
        written.append(path)
    if multi["pdf"]:
        path = out / "pages.pdf"
        first, *rest = multi["pdf"]
        first.save(path, save_all=True, append_images=rest, resolution=float(multi_dpi), quality=85)
        written.append(path)
    return written


def _parse_dpi(s: str) -> int | tuple[int, int]:
    if "-" in s:
        lo, hi = s.split("-", 1)
        return int(lo), int(hi)
    return int(s)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m hwr_batch.synth OUT_DIR --pages N --seed S [--dpi ..] [--format ..]``."""
    p = argparse.ArgumentParser(prog="python -m hwr_batch.synth", description="Generate synthetic scanned forms with truth JSON.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--pages", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=1, help="number of the first page (page_NNNN)")
    p.add_argument("--dpi", type=_parse_dpi, default=300, help="e.g. 300 or a range 200-300")
    p.add_argument("--format", nargs="+", default=["png"], choices=FORMATS, dest="formats")
    p.add_argument("--style", choices=("boxes", "lines"), default="boxes")
    p.add_argument("--clean", action="store_true", help="no scanner artefacts (no skew, blur, noise or shading)")
    p.add_argument("--noise", type=float, nargs=2, metavar=("LOW", "HIGH"), help="noise sigma range (gray levels)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get(DATA_DIR_ENV), help="folder with the MNIST IDX files")
    a = p.parse_args(argv)
    scan = CLEAN_SCAN if a.clean else ScanSpec()
    if a.noise:
        scan = ScanSpec(**{**scan.__dict__, "noise_sigma": tuple(a.noise)})
    files = write_forms(a.out_dir, a.pages, seed=a.seed, data_dir=a.data_dir, formats=a.formats, dpi=a.dpi,
                        spec=FormSpec(style=a.style), scan=scan, start=a.start)
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
