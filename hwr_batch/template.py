"""Form templates: named fields of one printed layout, and registering a scanned page to it.

A template is made from one sample page (:func:`create_template`): its printed boxes and combs, found by
:mod:`hwr_batch.layout`, become fields ``field_01``, ``field_02``, ... (the user renames them in the TOML),
and ORB features of the page at ~100 dpi (printed lines, boxes and text; handwriting differs from copy to
copy and falls out as RANSAC outliers) become its registration marks. :func:`register` finds the similarity
transform (rotation of any angle, so upside-down scans too, scale and shift) from the template's page to a
scanned page and scores it by how much of the template's box outlines lie on the page's ink there.
"""

from __future__ import annotations

import base64
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .atomic import reason_without_file
from .export import FORMULA_TRIGGERS
from .layout import MM_PER_INCH, analyse_page, box_iou, deskew

REGISTER_DPI = 100.0  # features are found at about this resolution
MIN_INLIERS = 40
MIN_SCORE = 0.7
SCALE_RANGE = (0.8, 1.25)  # a page printed or scanned at another size than this is not the form  # share of the template's box outline found on ink after registration


@dataclass(frozen=True)
class TemplateField:
    """One named zone: ``box`` (x, y, w, h) in template page pixels; ``cells`` 1 for a plain box; rules."""

    name: str
    box: tuple[int, int, int, int]
    cells: int = 1
    digits: int | None = None
    min: int | None = None
    max: int | None = None
    pattern: str | None = None
    optional: bool = False

    def broken_rules(self, text: str) -> list[str]:
        """The names of the rules ``text`` breaks (``optional`` allows an empty field)."""
        if not text:
            return [] if self.optional else ["required"]
        broken = []
        if self.digits is not None and len(text) != self.digits:
            broken.append("digits")
        if self.min is not None and (not text.isdigit() or int(text) < self.min):
            broken.append("min")
        if self.max is not None and (not text.isdigit() or int(text) > self.max):
            broken.append("max")
        if self.pattern is not None and not re.fullmatch(self.pattern, text):
            broken.append("pattern")
        return broken


@dataclass(frozen=True)
class Template:
    """A form layout: page size and dpi, registration features, named fields in column order."""

    name: str
    width: int
    height: int
    dpi: float
    fields: tuple[TemplateField, ...]
    keypoints: np.ndarray = field(repr=False, compare=False)  # (N, 2) float32, template page pixels
    descriptors: np.ndarray = field(repr=False, compare=False)  # (N, 32) uint8 ORB


@dataclass(frozen=True)
class Registration:
    """Where a page lies against a template: ``to_page`` 2x3 (template pixels to page pixels), and scores."""

    to_page: np.ndarray
    inliers: int
    score: float

    @property
    def ok(self) -> bool:
        return self.inliers >= MIN_INLIERS and self.score >= MIN_SCORE


def _small(gray: np.ndarray, dpi: float) -> tuple[np.ndarray, float]:
    s = min(1.0, REGISTER_DPI / dpi)
    return cv2.resize(gray, None, fx=s, fy=s, interpolation=cv2.INTER_AREA), s


_ORB = cv2.ORB_create(nfeatures=800, scaleFactor=1.3, nlevels=4, fastThreshold=15)


def _features(gray: np.ndarray, dpi: float) -> tuple[np.ndarray, np.ndarray]:
    small, s = _small(gray, dpi)
    kps, desc = _ORB.detectAndCompute(small, None)
    if desc is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.array([k.pt for k in kps], np.float32) / s, desc


def create_template(gray: np.ndarray, *, dpi: float, name: str = "form") -> Template:
    """A template from a blank or filled sample page: its printed boxes and combs become fields.

    The template's frame is the sample straightened (:func:`hwr_batch.layout.deskew`), so its boxes are upright.
    """
    angle = analyse_page(gray, mode="boxes", dpi=dpi).angle
    gray = deskew(gray, angle) if angle else gray
    layout = analyse_page(gray, mode="boxes", dpi=dpi)
    fields = tuple(
        TemplateField(f"field_{i:02d}", tuple(int(v) for v in f.bbox), max(1, len(f.cells)))
        for i, f in enumerate(layout.fields, 1)
    )
    kp, desc = _features(gray, dpi)
    return Template(name, gray.shape[1], gray.shape[0], float(dpi), fields, kp, desc)


def _outline_points(t: Template) -> np.ndarray:
    """Points along every field box's outline, every ~1 mm, in template pixels."""
    step = t.dpi / MM_PER_INCH
    pts = []
    for f in t.fields:
        x, y, w, h = f.box
        for a, b in (((x, y), (x + w, y)), ((x, y + h), (x + w, y + h)), ((x, y), (x, y + h)), ((x + w, y), (x + w, y + h))):
            n = max(2, int(max(abs(b[0] - a[0]), abs(b[1] - a[1])) / step))
            pts.append(np.linspace(a, b, n))
    return np.concatenate(pts).astype(np.float32) if pts else np.zeros((0, 2), np.float32)


def register(gray: np.ndarray, template: Template, *, dpi: float) -> Registration:
    """Register a page to ``template`` (ORB matches, RANSAC similarity) and score the fit."""
    none = Registration(np.eye(2, 3), 0, 0.0)
    kp, desc = _features(gray, dpi)
    if len(kp) < MIN_INLIERS or len(template.keypoints) < MIN_INLIERS:
        return none
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(template.descriptors, desc, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < MIN_INLIERS:
        return none
    src = template.keypoints[[m.queryIdx for m in good]]
    dst = kp[[m.trainIdx for m in good]]
    m, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0 * dpi / REGISTER_DPI)
    if m is None or not SCALE_RANGE[0] <= float(np.hypot(*m[:, 0])) <= SCALE_RANGE[1]:
        return none
    return Registration(m, int(mask.sum()), _outline_score(gray, dpi, template, m))


def _outline_score(gray: np.ndarray, dpi: float, template: Template, m: np.ndarray) -> float:
    """Share of the template's box outline points that land on dark pixels of the page (within ~0.5 mm)."""
    pts = _outline_points(template)
    if not len(pts):
        return 0.0
    small, s = _small(gray, dpi)
    ink = cv2.adaptiveThreshold(small, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 15, 12)
    ink = cv2.dilate(ink, np.ones((5, 5), np.uint8))
    on = (pts @ m[:, :2].T + m[:, 2]) * s
    xi, yi = np.round(on[:, 0]).astype(int), np.round(on[:, 1]).astype(int)
    inside = (xi >= 0) & (yi >= 0) & (xi < ink.shape[1]) & (yi < ink.shape[0])
    return float((ink[yi[inside], xi[inside]] > 0).sum() / len(pts))


def field_boxes(template: Template, reg: Registration) -> list[tuple[int, int, int, int]]:
    """Each template field's box mapped onto the page (axis-aligned, page pixels)."""
    out = []
    for f in template.fields:
        x, y, w, h = f.box
        c = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64) @ reg.to_page[:, :2].T + reg.to_page[:, 2]
        x0, y0 = c.min(axis=0)
        x1, y1 = c.max(axis=0)
        out.append((int(x0), int(y0), round(x1 - x0), round(y1 - y0)))
    return out


def to_template_frame(gray: np.ndarray, template: Template, reg: Registration) -> np.ndarray:
    """The page warped into the template's frame (upright, the template's size), for reading its zones."""
    inv = cv2.invertAffineTransform(reg.to_page)
    return cv2.warpAffine(gray, inv, (template.width, template.height), flags=cv2.INTER_LINEAR, borderValue=255)


# --------------------------------------------------------------------------------------- TOML


def dumps(t: Template) -> str:
    """The template as TOML: its page, a ``[[field]]`` table per field (rules ``digits``, ``min``, ``max``,
    ``pattern``, ``optional`` where set) and the ``[registration]`` features (base64; generated, not to edit)."""
    import tomli_w

    fields = []
    for f in t.fields:
        entry: dict = {"name": f.name, "box": list(f.box), "cells": f.cells}
        entry |= {rule: getattr(f, rule) for rule in ("digits", "min", "max", "pattern") if getattr(f, rule) is not None}
        if f.optional:
            entry["optional"] = True
        fields.append(entry)
    document = {
        "name": t.name, "width": t.width, "height": t.height, "dpi": t.dpi, "field": fields,
        "registration": {
            "keypoints": base64.b64encode(np.round(t.keypoints).astype("<i4").tobytes()).decode(),
            "descriptors": base64.b64encode(t.descriptors.tobytes()).decode(),
        },
    }
    return tomli_w.dumps(document)


def load(path: Path) -> Template:
    """Read a template written by :func:`dumps` (and edited by hand). Raises ValueError naming the file."""
    try:
        d = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        reg = d["registration"]
        kp = np.frombuffer(base64.b64decode(reg["keypoints"]), "<i4").reshape(-1, 2).astype(np.float32)
        desc = np.frombuffer(base64.b64decode(reg["descriptors"]), np.uint8).reshape(-1, 32)
        fields = tuple(
            TemplateField(f["name"], tuple(int(v) for v in f["box"]), int(f.get("cells", 1)), f.get("digits"),
                          f.get("min"), f.get("max"), f.get("pattern"), bool(f.get("optional", False)))
            for f in d.get("field", [])
        )
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError("two fields have the same name")
        return Template(str(d.get("name", Path(path).stem)), int(d["width"]), int(d["height"]), float(d["dpi"]),
                        fields, kp, desc)
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a usable template: {e}") from e


def draw(gray: np.ndarray, template: Template, reg: Registration) -> np.ndarray:
    """The page in colour with each template field outlined and named where it registered."""
    out = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    for f, (x, y, w, h) in zip(template.fields, field_boxes(template, reg)):
        cv2.rectangle(out, (x, y), (x + w, y + h), (0, 160, 0), 3)
        cv2.putText(out, f"{f.name} ({f.cells})", (x, max(12, y - 8)), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (200, 0, 0), 2)
    return out


# --------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FormReading:
    """One page read against its templates: the template matched (None: ``unregistered``), values and flags."""

    template: Template | None
    registration: Registration | None
    values: dict[str, str]
    flags: dict[str, str]

    @property
    def status(self) -> str:
        return "read" if self.template is not None else "unregistered"


def best_registration(gray: np.ndarray, templates: list[Template], *, dpi: float) -> tuple[Template, Registration] | None:
    """The template the page registers to best (by outline score, then inliers), or None if none passes."""
    fits = [(t, register(gray, t, dpi=dpi)) for t in templates]
    fits = [(t, r) for t, r in fits if r.ok]
    return max(fits, key=lambda tr: (tr[1].score, tr[1].inliers)) if fits else None


def read_zones(upright: np.ndarray, template: Template, classifier, *, threshold: float | None = None) -> tuple[dict, dict]:
    """Read each named field of a page already in the template's frame, as ``process`` reads boxes.

    The page's boxes are found and read by the normal path (:func:`hwr_batch.read.read_page`,
    :func:`hwr_batch.rows.classify_readings`) and matched to the template's fields (:func:`zone_values`).
    """
    from pathlib import PurePath

    from .read import TEMPLATE_ZONES, FileReading, read_page
    from .rows import classify_readings

    page, images = read_page(upright, dpi=template.dpi, settings=TEMPLATE_ZONES)
    _, rows, _ = classify_readings([FileReading(PurePath("page"), [page], images)], classifier, threshold=threshold)
    return zone_values(template, rows)


def zone_values(template: Template, field_rows: list[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """The values and flags of the template's fields, from the field rows of a page read in its frame.

    Each template field takes the box that overlaps it most (IoU >= 0.5). Flags are the reading's flag
    reasons, then the names of the rules broken, "; "-joined; a field whose box was not found reads ""
    and is flagged ``not found``.
    """
    values: dict[str, str] = {}
    flags: dict[str, str] = {}
    for f in template.fields:
        best = max(field_rows, key=lambda r: box_iou(f.box, (r["x"], r["y"], r["width"], r["height"])), default=None)
        if best is None or box_iou(f.box, (best["x"], best["y"], best["width"], best["height"])) < 0.5:
            values[f.name], reasons = "", ["not found"]
        else:
            values[f.name] = best["digits"]
            reasons = [r for r in best["flag_reason"].split("; ") if r]
            if f.cells > 1 and len(best["digits"]) > f.cells:
                reasons.append("cells")
        reasons += f.broken_rules(values[f.name])
        flags[f.name] = "; ".join(dict.fromkeys(reasons))
    return values, flags


def read_form(gray: np.ndarray, templates: list[Template], classifier, *, dpi: float,
              threshold: float | None = None) -> FormReading:
    """Register a page to the best of ``templates`` and read its named fields (``unregistered`` if none fits)."""
    fit = best_registration(gray, templates, dpi=dpi)
    if fit is None:
        return FormReading(None, None, {}, {})
    template, reg = fit
    values, flags = read_zones(to_template_frame(gray, template, reg), template, classifier,
                               threshold=threshold)
    return FormReading(template, reg, values, flags)


def form_columns(template: Template) -> list[str]:
    """The columns of a template's forms table: file, page, each field, each ``<field>_flag``, status."""
    names = [f.name for f in template.fields]
    return ["file", "page", *names, *(f"{n}_flag" for n in names), "status"]


def table_names(templates: list[Template]) -> dict[str, str]:
    """The forms table of each template, by template name: ``forms``, or ``forms-NAME`` for several templates."""
    return {t.name: "forms" if len(templates) == 1 else f"forms-{t.name}" for t in templates}


def form_row(file: str, page: int, template: Template, reading: FormReading) -> dict:
    """The ``forms.csv`` row of one page: file, page, each field, each ``<field>_flag``, status."""
    row: dict = {"file": file, "page": page}
    row.update({f.name: reading.values.get(f.name, "") for f in template.fields})
    row.update({f"{f.name}_flag": reading.flags.get(f.name, "") for f in template.fields})
    row["status"] = reading.status
    return row


def unregistered_error(file: str, page: int) -> dict:
    """The error row of a page that matches no template."""
    return {"file": file, "page": page, "stage": "register", "reason": "unregistered: the page matches no template"}


def read_forms(paths: list[Path], templates: list[Template], classifier, *, threshold: float | None = None
               ) -> tuple[dict[str, list[dict]], list[dict]]:
    """Read every page of ``paths`` against ``templates``: rows per template name, and error rows.

    A page no template fits becomes an error row (stage ``register``) and an ``unregistered`` row of the
    first template's table; a file that cannot be read becomes an error row; the other files go on.
    """
    from .atomic import display_path
    from .errors import HwrError
    from .layout import choose_dpi
    from .load import iter_pages

    tables: dict[str, list[dict]] = {t.name: [] for t in templates}
    errors: list[dict] = []
    for path in paths:
        file = display_path(path)
        try:
            for page in iter_pages(path):
                dpi, _ = choose_dpi(page.dpi, page.gray.shape)
                reading = read_form(page.gray, templates, classifier, dpi=dpi, threshold=threshold)
                template = reading.template or templates[0]
                tables[template.name].append(form_row(file, page.index + 1, template, reading))
                if reading.template is None:
                    errors.append(unregistered_error(file, page.index + 1))
        except HwrError as e:
            errors.append({"file": file, "page": None, "stage": "load", "reason": reason_without_file(path, str(e))})
    return tables, errors


def load_templates(paths: list[Path]) -> list[Template]:
    """Load the templates of one run: their names must differ and be usable as a file and sheet name
    (``forms-NAME.csv``, sheet ``forms-NAME``). Raises ValueError naming the file."""
    templates = [load(p) for p in paths]
    seen: dict[str, Path] = {}
    for path, t in zip(paths, templates):
        if len(t.name) > 25 or re.search(r"[\\/:*?\[\]\x00-\x1f]", t.name) or not t.name.strip():
            raise ValueError(f"{path}: the template's name {t.name!r} cannot name a table: use at most 25 characters, "
                             "and no slashes, colons, *, ?, [ or ]")
        columns = form_columns(t)
        bad = next((f.name for f in t.fields if f.name.startswith(FORMULA_TRIGGERS) or not f.name.strip()), None)
        if bad is not None:  # written as "'=x", its header would never match the template: every run would redo all
            raise ValueError(f"{path}: the field name {bad!r} cannot head a column: it must not be blank or start "
                             "with =, +, -, @, a tab or a carriage return")
        if len(set(columns)) != len(columns):
            raise ValueError(f"{path}: a field is named file, page or status, or as another field's <name>_flag: rename it")
        if t.name in seen:
            raise ValueError(f"{path}: the template's name {t.name!r} is also that of {seen[t.name]}: rename one")
        seen[t.name] = path
    return templates


# --------------------------------------------------------------------------------------- in process


def process_form_rows(readings: list, templates: tuple[Template, ...], classifier, *, threshold: float
                      ) -> tuple[dict[str, list[dict]], list[dict], float]:
    """The forms rows of files read with templates (their ``forms``, see :func:`hwr_batch.read.read_file`): rows per
    forms table (:func:`table_names`), the error rows of pages no template fits, and seconds in the model.

    As :func:`read_forms`: a page that fits no template is an ``unregistered`` row of the first template's table.
    """
    from .rows import classify_readings

    by_name = {t.name: t for t in templates}
    tables = table_names(list(templates))
    forms = [r.forms for r in readings if r.forms is not None]
    _, field_rows, seconds = classify_readings([f.reading for f in forms], classifier, threshold=threshold)
    per_page: dict[tuple[str, int], list[dict]] = {}
    for row in field_rows:
        per_page.setdefault((row["file"], row["page"]), []).append(row)
    rows: dict[str, list[dict]] = {name: [] for name in tables.values()}
    errors: list[dict] = []
    for f in forms:
        file = str(f.reading.path)
        for number, name in f.matched:
            if name is None:
                template, reading = templates[0], FormReading(None, None, {}, {})
                errors.append(unregistered_error(file, number))
            else:
                template = by_name[name]
                values, flags = zone_values(template, per_page.get((file, number), []))
                reading = FormReading(template, None, values, flags)
            rows[tables[template.name]].append(form_row(file, number, template, reading))
    return rows, errors, seconds
