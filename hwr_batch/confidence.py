"""How sure a field's reading is: the evidence of one field, a calibration record, and the review decision.

A field's **confidence** is the probability that its digit string is right. It is computed from what
the reading's correctness depends on (every digit's probability, the margin to the best reading of
another string, the "not a digit" score of the pieces read, the widest piece, the ink stepped over)
by gradient-boosted trees fitted on real fields the digit model never saw (LightGBM, at fit time),
constrained to be monotone where the direction is known (surer digits never lower the confidence,
more ink stepped over never raises it), and stored beside the model as ``<model>.calibration.json``
with the trees as an ONNX graph, run by ONNX Runtime like the digit model (``scripts/calibrate.py``
fits it; ``hwr-batch learn`` refits it). Records of the first release (a logistic model) still load.

A field is **accepted** (not flagged for review) when its confidence reaches the record's threshold for
the target error E, and no hard rule flags it. The threshold is the lowest confidence at which, on the
fields the record was fitted on (each scored by a record fitted without it), the fields accepted were
wrong at most E of the time: E is the error among accepted fields ("read rate at 1% error"), not a
bound on each field. A record without that curve (a logistic one) accepts at ``1 - E``. The hard rules:

- ``no_digits``: nothing was read;
- ``rejected_piece``: a digit was read from a piece the model calls "not a digit" more than that digit;
- ``dropped_ink``: ink over a fifth of a digit wide was stepped over as "not a digit" (often a lost digit);
- ``count_mismatch``: a comb's field holds more or fewer digits than it has cells.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .layout import regular_cells
from .segment import FieldCandidates, Reading, reading_margin

log = logging.getLogger(__name__)

# What the field confidence is computed from (see field_evidence), in this order.
FEATURES = (
    "log_p_sum",  # sum of the read digits' log-probabilities
    "log_p_min",  # the least sure digit's log-probability
    "label_gap_min",  # smallest log-ratio between a digit's top and second label
    "margin",  # best reading's score minus the best reading of another string
    "reject_max",  # highest "not a digit" probability among the pieces read as digits
    "digits",  # how many digits were read
    "widest",  # widest piece read, in digit heights
    "dropped",  # width stepped over as "not a digit", in digit heights
    "left_out",  # the biggest mark of the field its reading left out, in median digits' ink
)
_CAP = 20.0  # log-ratios beyond this say nothing more (and keep the features finite)
# The direction the confidence must move in as each feature grows (+1 up, -1 down, 0 free): the trees may
# learn any shape, but never that a surer digit or a wider margin makes a field less likely right.
MONOTONE = {
    "log_p_sum": 1, "log_p_min": 1, "label_gap_min": 1, "margin": 1,
    "reject_max": -1, "digits": 0, "widest": 0, "dropped": -1, "left_out": -1,
}

# Flag reasons, in the order they are listed.
REASONS = ("no_digits", "rejected_piece", "dropped_ink", "count_mismatch", "low_confidence")
# Ink stepped over as "not a digit" wider than this share of the digit height flags the field: on the fit
# sets such fields were wrong 32 times in 40 (a digit lost as a stroke or a speck), whatever their confidence.
DROPPED_INK_LIMIT = 0.2
DEFAULT_TARGET_ERROR = 0.01


def field_evidence(
    cands: FieldCandidates,
    probabilities: np.ndarray,
    reject_probabilities: np.ndarray | None,
    reading: Reading,
) -> np.ndarray:
    """The features of :data:`FEATURES` for one field's reading.

    Args:
        cands: the field's candidates.
        probabilities: (len(cands.pieces), 10) digit probabilities.
        reject_probabilities: (len(cands.pieces),) "not a digit" probabilities, or None.
        reading: what :func:`~hwr_batch.segment.read_field` chose.
    """
    chosen = reading.digits
    values = dict.fromkeys(FEATURES, 0.0)
    values["margin"] = min(reading_margin(cands, probabilities, reject_probabilities), _CAP)
    if chosen:
        probs = np.sort(np.asarray(probabilities, np.float64)[chosen], axis=1)
        logs = np.log(np.maximum(probs[:, -2:], 1e-9))
        height = max(cands.digit_height, 1.0)
        values["log_p_sum"] = float(logs[:, 1].sum())
        values["log_p_min"] = float(logs[:, 1].min())
        values["label_gap_min"] = float(min((logs[:, 1] - logs[:, 0]).min(), _CAP))
        values["digits"] = float(len(chosen))
        values["widest"] = max(cands.pieces[i].bbox[2] for i in chosen) / height
        if reject_probabilities is not None:
            values["reject_max"] = float(np.asarray(reject_probabilities)[chosen].max())
        values["dropped"] = dropped_width(cands, reading)
        values["left_out"] = min(cands.left_out, _CAP)
    return np.array([values[name] for name in FEATURES], np.float64)


def dropped_width(cands: FieldCandidates, reading: Reading) -> float:
    """Width of the ink a reading steps over as "not a digit", in digit heights."""
    return sum(cands.pieces[i].bbox[2] for i in reading.rejected) / max(cands.digit_height, 1.0)


def hard_flags(
    cands: FieldCandidates,
    probabilities: np.ndarray,
    reject_probabilities: np.ndarray | None,
    reading: Reading,
    cells: tuple[tuple[int, int], ...] = (),
) -> list[str]:
    """The rules that flag a field whatever its confidence (see the module docstring), by name.

    Args:
        cells: a comb's cells as (x0, x1) column ranges in the field's pixels (empty: not a comb).
    """
    chosen = reading.digits
    if not chosen:
        return ["no_digits"]
    reasons = []
    if reject_probabilities is not None:
        top = np.asarray(probabilities)[chosen].max(axis=1)
        if (np.asarray(reject_probabilities)[chosen] > top).any():
            reasons.append("rejected_piece")
    if dropped_width(cands, reading) > DROPPED_INK_LIMIT:
        reasons.append("dropped_ink")
    if len(cells) >= 2 and comb_count_mismatch(cands, reading, cells):
        reasons.append("count_mismatch")
    return reasons


def comb_count_mismatch(cands: FieldCandidates, reading: Reading, cells: tuple[tuple[int, int], ...]) -> bool:
    """Whether a comb's reading breaks "one digit per cell": a digit outside the inked cells, two digits
    in one cell, or an inked cell with no digit (a cell is inked when ink covers 40% of its width, or
    most of a narrow stroke such as a 1 lies in it)."""
    cells = regular_cells(cells)
    if not cells:
        return False
    homes = []
    for i in reading.digits:
        x, _, w, _ = cands.pieces[i].bbox
        centre = x + w / 2
        homes.append(next((k for k, (x0, x1) in enumerate(cells) if x0 <= centre < x1), -1))
    inked = set()
    for unit in cands.units:
        boxes = [cands.pieces[i].bbox for _, _, i in unit.spans]
        left, right = min(b[0] for b in boxes), max(b[0] + b[2] for b in boxes)
        for k, (x0, x1) in enumerate(cells):
            if min(right, x1) - max(left, x0) >= min(0.4 * (x1 - x0), 0.6 * (right - left)):
                inked.add(k)
    return -1 in homes or len(set(homes)) != len(homes) or set(homes) != inked


@dataclass(frozen=True)
class Calibration:
    """A fitted map from a field's evidence to the probability that its reading is right.

    Attributes:
        features: names of the features it was fitted on, each one of :data:`FEATURES` (a record of an
            earlier release, fitted on fewer, reads its own columns of the evidence; one naming a feature
            this version does not compute is refused).
        trees_onnx: the boosted trees as an ONNX model (base64; input ``evidence`` (n, features)
            float32, output ``probabilities`` (n, 2)); empty in a logistic record.
        mean, scale, coef, intercept: a logistic model on the standardised features (records of the
            first release; used when there are no trees).
        model_sha256: the digit model it was fitted for.
        accept_curve: ``(threshold, error among accepted, share accepted)`` rows, thresholds falling: the
            fit fields' out-of-fold confidences swept from the top (see :meth:`threshold`); empty in
            records of the first release.
        fitted_on: what it was fitted on (sets and field counts), for the record.
        figures: what it measured (expected calibration error, accept rates), for the record.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    coef: tuple[float, ...] = ()
    intercept: float = 0.0
    trees_onnx: str = ""
    model_sha256: str = ""
    accept_curve: tuple[tuple[float, float, float], ...] = ()
    fitted_on: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)

    def threshold(self, target_error: float) -> float:
        """The confidence a field needs to be accepted at ``target_error`` (the error among accepted fields).

        The lowest threshold of :attr:`accept_curve` whose accepted fit fields were wrong at most
        ``target_error`` of the time; 1.0 if none was (only a certain field is accepted); ``1 -
        target_error`` for a record without a curve.
        """
        if not self.accept_curve:
            return 1.0 - target_error
        reached = [t for t, error, _ in self.accept_curve if error <= target_error]
        return min(reached) if reached else 1.0

    @cached_property
    def _columns(self) -> list[int]:
        return [FEATURES.index(name) for name in self.features]

    @cached_property
    def _trees(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the converter's declared label shape is wrong; only probabilities are read
        return ort.InferenceSession(base64.b64decode(self.trees_onnx), options, providers=["CPUExecutionProvider"])

    def confidence(self, evidence: np.ndarray) -> np.ndarray:
        """P(reading right) for (n, len(FEATURES)) evidence (or one field's (len(FEATURES),))."""
        x = np.asarray(evidence, np.float64)[..., self._columns]
        if self.trees_onnx:
            (p,) = self._trees.run(["probabilities"], {"evidence": np.atleast_2d(x).astype(np.float32)})
            return p[:, 1].astype(np.float64) if x.ndim == 2 else float(p[0, 1])
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def save(self, path: Path) -> None:
        """Write the record as JSON (atomically)."""
        from .atomic import atomic_write

        text = json.dumps(asdict(self), indent=1) + "\n"
        atomic_write(Path(path), lambda f: f.write(text), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read a record written by :meth:`save`.

        Raises:
            ValueError: not a calibration record for these features, or its trees do not load.
        """
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["accept_curve"] = tuple(map(tuple, data.get("accept_curve", ())))
        record = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        unknown = [name for name in record.features if name not in FEATURES]
        if unknown or not record.features:
            raise ValueError(f"{path}: fitted on features {list(record.features)}, this version computes {list(FEATURES)}")
        if record.trees_onnx:
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

            try:
                record._trees  # noqa: B018 - parse now, so that a broken record is refused at load
            except (ValueError, Fail, InvalidGraph, InvalidProtobuf) as e:  # base64 errors are ValueErrors
                raise ValueError(f"{path}: its trees do not load ({e})") from None
        elif len(record.coef) != len(record.features):
            raise ValueError(f"{path}: neither trees nor a logistic model for {len(record.features)} features")
        return record


def calibration_path(model_path: Path) -> Path:
    """Where a model's calibration record lives: ``hwr-digits.onnx`` -> ``hwr-digits.calibration.json``."""
    return Path(model_path).with_suffix(".calibration.json")


def load_calibration(model_path: Path, model_sha256: str = "") -> Calibration | None:
    """The calibration record beside a model, or None (logged) if there is none or it does not fit."""
    path = calibration_path(model_path)
    if not path.is_file():
        log.warning(
            "%s: no calibration record beside the model; field confidence is the product of the digits' "
            "probabilities, not calibrated (hwr-batch learn writes one)", path,
        )
        return None
    try:
        record = Calibration.load(path)
    except (OSError, ValueError, TypeError) as e:
        log.warning("%s: not used (%s); field confidence is not calibrated", path, e)
        return None
    if model_sha256 and record.model_sha256 and record.model_sha256 != model_sha256:
        log.warning("%s: fitted for another model (sha256 %s...); used all the same", path, record.model_sha256[:12])
    return record


def field_confidence(calibration: Calibration | None, evidence: np.ndarray) -> float:
    """P(reading right) of one field: calibrated, or the product of its digits' probabilities without a record."""
    if calibration is None:
        return float(np.exp(evidence[FEATURES.index("log_p_sum")])) if evidence[FEATURES.index("digits")] else 0.0
    return float(calibration.confidence(evidence))


def accept_threshold(calibration: Calibration | None, target_error: float = DEFAULT_TARGET_ERROR,
                     min_confidence: float | None = None) -> float:
    """The confidence a field needs to be accepted: ``min_confidence`` if given, else the record's
    threshold for ``target_error`` (:meth:`Calibration.threshold`), else ``1 - target_error``."""
    if min_confidence is not None:
        return min_confidence
    return calibration.threshold(target_error) if calibration is not None else 1.0 - target_error


def review_reasons(confidence: float, threshold: float, hard: list[str]) -> list[str]:
    """Why a field is flagged (empty: accepted): the hard rules, then ``low_confidence`` under ``threshold``."""
    reasons = list(hard)
    if "no_digits" not in reasons and confidence < threshold:
        reasons.append("low_confidence")
    return reasons


def fit_calibration(evidence: np.ndarray, right: np.ndarray, acceptable: np.ndarray | None = None,
                    folds: int = 5, **record) -> Calibration:
    """Fit a :class:`Calibration` on fields' evidence and whether each was read right: LightGBM trees
    (binary log-loss, monotone as :data:`MONOTONE` says, leaves of at least 20-50 fields), converted
    to ONNX (onnxmltools). Needs the training extra (lightgbm, onnxmltools).

    Its :attr:`~Calibration.accept_curve` comes from cross-fitting: each of ``folds`` parts of the
    fields is scored by trees fitted on the others, and those out-of-fold confidences of the
    ``acceptable`` fields (those no hard rule flags; default all) are swept from the top (``folds`` < 2:
    no curve, and the record accepts at ``1 - E``). Deterministic: one thread, fixed seeds. ``record``
    goes into the result (``model_sha256``, ``fitted_on``, ``figures``).
    """
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    x = np.asarray(evidence, np.float64)
    y = np.asarray(right, bool)
    booster = _fit_trees(x, y)
    curve = ()
    if folds >= 2:
        out_of_fold = np.empty(len(y))
        for part in np.array_split(np.random.default_rng(20261203).permutation(len(y)), folds):
            rest = np.setdiff1d(np.arange(len(y)), part)
            out_of_fold[part] = _fit_trees(x[rest], y[rest]).predict(x[part])
        ok = np.ones(len(y), bool) if acceptable is None else np.asarray(acceptable, bool)
        curve = accept_curve(out_of_fold[ok], y[ok], total=len(y))
    graph = convert_lightgbm(booster, initial_types=[("evidence", FloatTensorType([None, len(FEATURES)]))],
                             target_opset=15, zipmap=False)
    return Calibration(features=FEATURES, trees_onnx=base64.b64encode(graph.SerializeToString()).decode("ascii"),
                       accept_curve=curve, **record)


def _fit_trees(x: np.ndarray, y: np.ndarray):
    import lightgbm

    params = {
        "objective": "binary", "num_leaves": 15, "learning_rate": 0.05, "lambda_l2": 1.0,
        "min_child_samples": int(np.clip(len(y) // 100, 20, 50)),
        "monotone_constraints": [MONOTONE[name] for name in FEATURES],
        "monotone_constraints_method": "advanced",
        "num_threads": 1, "deterministic": True, "force_row_wise": True, "seed": 20261203, "verbose": -1,
    }
    return lightgbm.train(params, lightgbm.Dataset(x, y.astype(np.float64), feature_name=list(FEATURES)),
                          num_boost_round=300)


def accept_curve(confidence: np.ndarray, right: np.ndarray, total: int | None = None,
                 points: int = 200) -> tuple[tuple[float, float, float], ...]:
    """``(threshold, error among accepted, share of ``total`` accepted)`` as a threshold falls through
    ``confidence``, at about ``points`` thresholds (each the confidence of a field, so that every field
    at or above it is counted), the last at the lowest confidence."""
    confidence = np.asarray(confidence, np.float64)
    right = np.asarray(right, bool)
    if not len(confidence):
        return ()
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    wrong = np.cumsum(~right[order])
    # the last field of each run of equal confidences: a threshold accepts all of them or none
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    step = max(1, len(ends) // points)
    chosen = np.unique(np.r_[ends[step - 1 :: step], ends[-1]])
    total = total or len(confidence)
    # thresholds rounded down, so that the field a threshold is taken from stays accepted
    return tuple((float(np.floor(conf[i] * 1e6) / 1e6), round(float(wrong[i] / (i + 1)), 6), round((i + 1) / total, 6))
                 for i in chosen)


def reliability_bins(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Fields grouped in equal-width confidence bins: each non-empty bin's edges, field count, mean
    confidence and share read right (a reliability diagram's points)."""
    confidence = np.asarray(confidence, np.float64)
    right = np.asarray(right, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return [
        {"low": float(edges[b]), "high": float(edges[b + 1]), "fields": int((which == b).sum()),
         "confidence": float(confidence[which == b].mean()), "right": float(right[which == b].mean())}
        for b in range(bins) if (which == b).any()
    ]


def expected_calibration_error(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their share of fields."""
    points = reliability_bins(confidence, right, bins)
    total = sum(p["fields"] for p in points)
    return float(sum(p["fields"] / total * abs(p["right"] - p["confidence"]) for p in points)) if total else 0.0
