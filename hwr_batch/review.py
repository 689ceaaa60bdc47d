"""Review flagged fields in the browser: a local verification station whose corrections feed ``learn``.

The server binds to 127.0.0.1 only and refuses every request without the random token in its URL. Fields are
the rows of OUT/fields.csv (read by column name); crops are cut from the scans that fields.csv names, so the
scans must still be where ``process`` read them. A request names a field by its row number in the table,
never by a path, so nothing outside the run's files can be read.

Each saved review goes at once, in one transaction, into the run's state database (table ``corrections``,
with the scan's content hash and the field's box: see :mod:`hwr_batch.corrections`) and OUT/corrections.csv
(rewritten atomically under the database's write lock), the file ``hwr-batch learn OUT`` reads. A ``process``
run may be going on meanwhile: both write the database in short transactions and wait for each other's lock.
(An OUT/.hwr-batch/review.sqlite of the first version of this page is not read: it never shipped in a release.)
"""

from __future__ import annotations

import csv
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from .atomic import parse_display_text
from .corrections import CORRECTION_COLUMNS, STATUSES, FieldKey, match_corrections, write_corrections_csv
from .errors import DatasetError, HwrError, InputFileError
from .state import (
    STATE_DB_NAME,
    CorrectionRecord,
    UnstableFileError,
    content_hashes,
    fingerprint,
    get_record,
    open_state,
    path_key,
    read_corrections,
    save_corrections,
    with_sha256,
)

CONTEXT_MARGIN = 40  # pixels of page around the field's box in a crop
MAX_PAGE_SIZE = 200
PAGES_KEPT = 6  # decoded pages kept in memory (a 300 dpi A4 page in grey is 8.7 MB)


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
    digits_read: tuple[tuple[str, str, int, int, int, int], ...] = ()  # (digit, confidence, x, y, width, height)

    @property
    def key(self) -> FieldKey:
        return FieldKey(self.file, self.page, self.field, self.box)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None


def load_fields(out: Path) -> list[ReviewField]:
    """Every field of a run folder that has a box (the page shows the flagged ones, or all with ``--all``).

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
    per_digit: dict[tuple[str, str, str], list[tuple[str, str, int, int, int, int]]] = {}
    digits_csv = Path(out) / "digits.csv"
    if digits_csv.exists():
        for row in _read_csv(digits_csv):
            try:
                box = tuple(int(float(row[c])) for c in ("x", "y", "width", "height"))
            except (KeyError, ValueError):
                continue
            per_digit.setdefault((row.get("file", ""), row.get("page", ""), row.get("field", "")), []).append(
                (row.get("digit", ""), row.get("confidence", ""), *box)  # type: ignore[arg-type]
            )
    fields = []
    for index, row in enumerate(rows):
        try:
            box = tuple(int(float(row[c])) for c in ("x", "y", "width", "height"))
            page, field = int(row["page"]), int(row["field"])
        except ValueError:
            continue  # a row without a box (e.g. a page that failed) has nothing to show
        fields.append(ReviewField(
            index=index, file=row["file"], page=page, field=field, box=box,  # type: ignore[arg-type]
            digits=row["digits"].lstrip("'"),
            confidence=row.get("confidence") or row.get("min_confidence", ""),
            flag_reason=row.get("flag_reason", ""), flagged=row["flagged"].strip().lower() == "true",
            digits_read=tuple(per_digit.get((row["file"], row["page"], row["field"]), ())),
        ))
    return fields


class FileChangedError(HwrError):
    """The scan changed since ``process`` read it: its fields may no longer be where the table says."""

    exit_code = InputFileError.exit_code


class ReviewStore:
    """Saved reviews: rows of the state database's ``corrections`` table, mirrored into OUT/corrections.csv.

    Each request opens the database anew (the server answers from many threads; opening costs well under a
    millisecond). ``fields`` are all the rows of fields.csv: corrections.csv lists those with a review.
    """

    def __init__(self, out: Path, fields: list[ReviewField], *, state_dir: Path | None = None) -> None:
        self.out = Path(out)
        self.database = Path(state_dir or self.out / ".hwr-batch") / STATE_DB_NAME
        self.fields = fields
        self._hashed: dict[bytes, str] = {}  # content hashes taken here, of files the database has no record of
        with open_state(self.database):  # create or upgrade it now, not on the first save
            pass

    def save(self, field: ReviewField, digits: str, status: str) -> dict[str, str]:
        """Record one review and rewrite corrections.csv; returns the saved row (corrections.csv's columns).

        Raises:
            ValueError: an unknown status, or digits that are not digits for accepted/corrected.
            FileChangedError: the scan's content is no longer what ``process`` read.
            StateDbError: the database cannot be written.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        digits = digits.strip()
        if status in ("accepted", "corrected") and not digits.isdigit():
            raise ValueError("digits must be digits only")
        if status not in ("accepted", "corrected"):
            digits = ""
        reviewed_at = datetime.now(UTC).isoformat(timespec="seconds")
        path = Path(parse_display_text(field.file))
        with open_state(self.database) as db:
            record = CorrectionRecord(path, self._content_sha(db, path), field.page, field.field, field.box,
                                      field.digits, digits, status, reviewed_at)
            save_corrections(db, [record], then=lambda every: self._mirror(db, every))
        return dict(zip(CORRECTION_COLUMNS, (field.file, str(field.page), str(field.field), digits, status,
                                             reviewed_at), strict=True))

    def _content_sha(self, db, path: Path) -> str:
        """The hash of the content ``process`` read: the recorded one while size and mtime are unchanged."""
        record = get_record(db, path)
        try:
            now = fingerprint(path)
            if record is not None and record.sha256 and (record.size, record.mtime_ns) == (now.size, now.mtime_ns):
                return record.sha256
            sha = with_sha256(path, now).sha256
        except (OSError, UnstableFileError) as e:
            raise FileChangedError(f"{path}: cannot read the scan ({e})") from None
        if record is not None and record.sha256 != sha:
            raise FileChangedError(f"{path}: changed since `process` read it; run process again to review it")
        self._hashed[path_key(path)] = sha  # type: ignore[assignment]
        return sha  # type: ignore[return-value]

    def _mirror(self, db, corrections: list[CorrectionRecord]) -> None:
        keys = [f.key for f in self.fields]
        write_corrections_csv(self.out, keys, match_corrections(keys, corrections, self._content(db, corrections)))

    def _content(self, db, corrections: list[CorrectionRecord]) -> dict[bytes, str | None]:
        return {**self._hashed, **content_hashes(db, [c.path for c in corrections])}

    def reviews(self, fields: list[ReviewField]) -> list[CorrectionRecord | None]:
        """The saved review of each of ``fields`` (None: none)."""
        with open_state(self.database) as db:
            corrections = read_corrections(db)
            return match_corrections([f.key for f in fields], corrections, self._content(db, corrections)) if corrections else [
                None] * len(fields)


def crop_origin(field: ReviewField, *, margin: int = CONTEXT_MARGIN) -> tuple[int, int]:
    """Where the crop of ``field`` starts on its page: (x, y) in pixels."""
    return max(0, field.box[0] - margin), max(0, field.box[1] - margin)


def render_crop(field: ReviewField, *, margin: int = CONTEXT_MARGIN) -> bytes:
    """PNG of the field's box and some page around it, cut from the scan fields.csv names.

    Raises:
        InputFileError: the scan cannot be read (moved, changed, corrupt).
        LookupError: the scan has no such page.
    """
    import cv2

    path = Path(parse_display_text(field.file))
    try:
        stat = path.stat()
    except OSError as e:
        raise InputFileError(f"{field.file}: cannot read the scan ({e.strerror or e})") from None
    gray = _page_image(path, field.page, stat.st_size, stat.st_mtime_ns)
    x, y, w, h = field.box
    height, width = gray.shape[:2]
    left, top = crop_origin(field, margin=margin)
    ok, png = cv2.imencode(".png", gray[top:min(height, y + h + margin), left:min(width, x + w + margin)])
    if not ok:
        raise LookupError(f"{field.file}: cannot encode the crop")
    return png.tobytes()


def _warm(field: ReviewField) -> None:
    try:
        render_crop(field)
    except (LookupError, HwrError):
        pass  # the page's request reports it


@lru_cache(maxsize=PAGES_KEPT)
def _page_image(path: Path, page: int, size: int, mtime_ns: int):
    """Page ``page`` (from 1) of a scan, decoded; kept for the next fields on it (decoding a 300 dpi page takes
    150-450 ms here, a crop of it 1 ms). Size and mtime are in the key, so a changed scan is decoded anew."""
    from .load import iter_pages

    for decoded in iter_pages(path):
        if decoded.index + 1 == page:
            return decoded.gray
    raise LookupError(f"{path}: has no page {page}")


def create_app(out: Path, *, token: str, include_all: bool = False, state_dir: Path | None = None):
    """The Flask app serving the review page and its JSON API for the run folder ``out``."""
    from flask import Flask, abort, jsonify, request

    every_field = load_fields(out)
    fields = [f for f in every_field if f.flagged or include_all]
    by_index = {f.index: f for f in fields}
    store = ReviewStore(out, every_field, state_dir=state_dir)
    if fields:  # decode the first field's page while the browser opens
        threading.Thread(target=_warm, args=(fields[0],), name="hwr-batch-review-warm", daemon=True).start()
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
        shown = chosen[offset:offset + limit]
        items = []
        for f, review in zip(shown, store.reviews(shown), strict=True):
            left, top = crop_origin(f)
            items.append({
                "index": f.index, "file": f.file, "page": f.page, "field": f.field, "box": list(f.box), "digits": f.digits,
                "confidence": f.confidence, "flag_reason": f.flag_reason, "flagged": f.flagged,
                # each digit read, with its box in the crop's pixels (drawn under the box by the page)
                "digits_read": [
                    {"digit": d, "confidence": c, "x": x - left, "y": y - top, "width": w, "height": h}
                    for d, c, x, y, w, h in f.digits_read
                ],
                "review_status": review.status if review else "", "reviewed_digits": review.digits if review else "",
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
        except FileChangedError as e:
            return jsonify({"error": str(e)}), 409
        except HwrError as e:  # the state database cannot be written (full disk, locked too long)
            return jsonify({"error": str(e)}), 503
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


def start_review(
    out: Path, *, port: int = 0, include_all: bool = False, state_dir: Path | None = None
) -> ReviewServer:
    """Serve the review page for ``out`` on 127.0.0.1 in a background thread.

    Raises:
        DatasetError: OUT/fields.csv cannot be read.
    """
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its request lines would log the token
    token = secrets.token_urlsafe(24)
    app = create_app(out, token=token, include_all=include_all, state_dir=state_dir)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="hwr-batch-review", daemon=True)
    thread.start()
    return ReviewServer(f"http://127.0.0.1:{server.server_port}/?token={token}", server, thread)
