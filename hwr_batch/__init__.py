"""hwr-batch: read handwritten digits off scanned forms, in batches, into CSV and spreadsheets."""

from __future__ import annotations

__version__ = "0.1.0"
