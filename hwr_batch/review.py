"""Review flagged fields in the browser: a local verification station whose corrections feed ``learn``.

The server binds to 127.0.0.1 only and refuses every request without the random token in its URL. Fields are
the rows of OUT/fields.csv (read by column name); crops are cut from the scans that fields.csv names, so the
scans must still be where ``process`` read them. A request names a field by its row number in the table,
never by a path, so nothing outside the run's files can be read.

Each saved review goes at once into OUT/.hwr-batch/review.sqlite and OUT/corrections.csv (rewritten
atomically), the file ``hwr-batch learn OUT`` reads.
"""

from __future__ import annotations

import csv
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .atomic import atomic_write
from .errors import DatasetError, HwrError

STATUSES = ("accepted", "corrected", "not_a_field", "unreadable")
CORRECTION_COLUMNS = ("file", "page", "field", "digits", "status", "reviewed_at")
CONTEXT_MARGIN = 40  # pixels of page around the field's box in a crop
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class ReviewField:
    """One row of fields.csv offered for review; ``index`` is its 0-based row number in the table."""

    index: int
    file: str
    page: int
    field: int
    box: tuple[int, int, int, int]
    digits: str
    confidence: str
    flag_reason: str
    flagged: bool
    digit_confidences: tuple[str, ...] = ()


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None


def load_fields(out: Path, *, include_all: bool = False) -> list[ReviewField]:
    """The fields of a run folder to review: the flagged ones, or all with ``include_all``.

    Columns are looked up by name, so fields.csv with or without a ``confidence`` column both work.

    Raises:
        DatasetError: OUT/fields.csv is missing, unreadable or lacks a needed column.
    """
    path = Path(out) / "fields.csv"
    rows = _read_csv(path)
    needed = ("file", "page", "field", "x", "y", "width", "height", "digits", "flagged")
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing:
        raise DatasetError(f"{path}: missing the columns {', '.join(missing)}")
    per_digit: dict[tuple[str, str, str], list[str]] = {}
    digits_csv = Path(out) / "digits.csv"
    if digits_csv.exists():
        for row in _read_csv(digits_csv):
            per_digit.setdefault((row.get("file", ""), row.get("page", ""), row.get("field", "")), []).append(
                row.get("confidence", "")
            )
    fields = []
    for index, row in enumerate(rows):
        flagged = row["flagged"].strip().lower() == "true"
        if not (flagged or include_all):
            continue
        try:
            box = tuple(int(float(row[c])) for c in ("x", "y", "width", "height"))
            page, field = int(row["page"]), int(row["field"])
        except ValueError:
            continue  # a row without a box (e.g. a page that failed) has nothing to show
        fields.append(ReviewField(
            index=index, file=row["file"], page=page, field=field, box=box,  # type: ignore[arg-type]
            digits=row["digits"].lstrip("'"),
            confidence=row.get("confidence") or row.get("min_confidence", ""),
            flag_reason=row.get("flag_reason", ""), flagged=flagged,
            digit_confidences=tuple(per_digit.get((row["file"], row["page"], row["field"]), ())),
        ))
    return fields


class ReviewStore:
    """Saved reviews: a SQLite table (durable at once) mirrored into OUT/corrections.csv."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        state_dir = self.out / ".hwr-batch"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(state_dir / "review.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS reviews (file TEXT, page INTEGER, field INTEGER, digits TEXT,"
            " status TEXT, reviewed_at TEXT, PRIMARY KEY (file, page, field))"
        )

    def save(self, field: ReviewField, digits: str, status: str) -> dict[str, str]:
        """Record one review and rewrite corrections.csv; returns the saved row.

        Raises:
            ValueError: an unknown status, or digits that are not digits for accepted/corrected.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        digits = digits.strip()
        if status in ("accepted", "corrected") and not digits.isdigit():
            raise ValueError("digits must be digits only")
        if status not in ("accepted", "corrected"):
            digits = ""
        reviewed_at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO reviews VALUES (?, ?, ?, ?, ?, ?)",
                (field.file, field.page, field.field, digits, status, reviewed_at),
            )
            self._write_csv()
        return dict(zip(CORRECTION_COLUMNS, (field.file, str(field.page), str(field.field), digits, status,
                                             reviewed_at), strict=True))

    def reviews(self) -> dict[tuple[str, int, int], dict[str, str]]:
        """Every saved review, by (file, page, field)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM reviews ORDER BY file, page, field").fetchall()
        return {(r[0], r[1], r[2]): dict(zip(CORRECTION_COLUMNS, map(str, r), strict=True)) for r in rows}

    def _write_csv(self) -> None:
        rows = self._db.execute("SELECT * FROM reviews ORDER BY file, page, field").fetchall()

        def write(f) -> None:
            writer = csv.writer(f)
            writer.writerow(CORRECTION_COLUMNS)
            writer.writerows(rows)

        atomic_write(self.out / "corrections.csv", write, newline="", encoding="utf-8")

    def close(self) -> None:
        self._db.close()


def render_crop(field: ReviewField, *, margin: int = CONTEXT_MARGIN) -> bytes:
    """PNG of the field's box and some page around it, cut from the scan fields.csv names.

    Raises:
        InputFileError: the scan cannot be read (moved, changed, corrupt).
        LookupError: the scan has no such page.
    """
    import cv2

    from .atomic import parse_display_text
    from .load import iter_pages

    for page in iter_pages(Path(parse_display_text(field.file))):
        if page.index + 1 == field.page:
            x, y, w, h = field.box
            height, width = page.gray.shape[:2]
            crop = page.gray[max(0, y - margin):min(height, y + h + margin), max(0, x - margin):min(width, x + w + margin)]
            ok, png = cv2.imencode(".png", crop)
            if not ok:
                raise LookupError(f"{field.file}: cannot encode the crop")
            return png.tobytes()
    raise LookupError(f"{field.file}: has no page {field.page}")


def create_app(out: Path, *, token: str, include_all: bool = False):
    """The Flask app serving the review page and its JSON API for the run folder ``out``."""
    from flask import Flask, abort, jsonify, request

    fields = load_fields(out, include_all=include_all)
    by_index = {f.index: f for f in fields}
    store = ReviewStore(out)
    app = Flask(__name__, static_folder=None)
    static = Path(__file__).resolve().parent / "review_static"

    @app.before_request
    def require_token():
        given = request.args.get("token") or request.headers.get("X-Review-Token", "")
        if not secrets.compare_digest(given, token):
            abort(403)

    # The script is inlined: a <script src> request would carry no token.
    html = (static / "review.html").read_text(encoding="utf-8").replace(
        '<script src="review.js"></script>', "<script>" + (static / "review.js").read_text(encoding="utf-8") + "</script>"
    )

    @app.get("/")
    def page():
        return html, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/api/fields")
    def api_fields():
        offset = max(0, request.args.get("offset", 0, type=int))
        limit = min(MAX_PAGE_SIZE, max(1, request.args.get("limit", 50, type=int)))
        file_filter, reason_filter = request.args.get("file", ""), request.args.get("reason", "")
        chosen = [f for f in fields if file_filter in f.file and reason_filter in f.flag_reason]
        saved = store.reviews()
        items = []
        for f in chosen[offset:offset + limit]:
            review = saved.get((f.file, f.page, f.field), {})
            items.append({
                "index": f.index, "file": f.file, "page": f.page, "field": f.field, "digits": f.digits,
                "confidence": f.confidence, "digit_confidences": list(f.digit_confidences),
                "flag_reason": f.flag_reason, "flagged": f.flagged,
                "review_status": review.get("status", ""), "reviewed_digits": review.get("digits", ""),
            })
        return jsonify({"total": len(chosen), "offset": offset, "fields": items})

    @app.get("/api/crop/<int:index>")
    def api_crop(index: int):
        field = by_index.get(index)
        if field is None:
            abort(404)
        try:
            png = render_crop(field)
        except (LookupError, HwrError) as e:
            return jsonify({"error": str(e)}), 410
        return png, 200, {"Content-Type": "image/png", "Cache-Control": "private, max-age=3600"}

    @app.post("/api/review")
    def api_review():
        body = request.get_json(silent=True) or {}
        field = by_index.get(body.get("index")) if isinstance(body.get("index"), int) else None
        if field is None:
            abort(404)
        try:
            row = store.save(field, str(body.get("digits", "")), str(body.get("status", "")))
        except ValueError as e:
            return jsonify({"error": str(e)}), 400
        return jsonify(row)

    app.extensions["hwr_batch_review_store"] = store
    return app


@dataclass
class ReviewServer:
    """A running review server: ``url`` carries the token; ``stop()`` ends it."""

    url: str
    _server: object
    _thread: threading.Thread

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._thread.join()


def start_review(out: Path, *, port: int = 0, include_all: bool = False) -> ReviewServer:
    """Serve the review page for ``out`` on 127.0.0.1 in a background thread.

    Raises:
        DatasetError: OUT/fields.csv cannot be read.
    """
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its request lines would log the token
    token = secrets.token_urlsafe(24)
    app = create_app(out, token=token, include_all=include_all)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="hwr-batch-review", daemon=True)
    thread.start()
    return ReviewServer(f"http://127.0.0.1:{server.server_port}/?token={token}", server, thread)
