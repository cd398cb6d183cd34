"""Reader-study ratings: an SQLite store, CSV export, Fleiss' kappa and mean scores.

One row per (rater, image, hidden model, hidden method, explained class); rating the same map again
replaces the earlier score. Pure Python + sqlite3, so the HTML report can read it without FastAPI.
"""

from __future__ import annotations

import csv
import io
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cxrlens.errors import CxrlensError

SCORES = (1, 2, 3, 4, 5)  # 1 = looks elsewhere, 5 = looks at the pathology
CSV_COLUMNS = ("rater", "time", "image_id", "cls", "model", "method", "score")
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection); OWASP's advice:
# prefix such a cell with a single quote and quote every text field.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rater TEXT NOT NULL,
    time TEXT NOT NULL,
    image_id TEXT NOT NULL,
    cls TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5),
    UNIQUE (rater, image_id, cls, model, method)
);
"""


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa for ``counts[item][category]`` = number of raters who put the item in the category.

    Items with fewer than two ratings carry no agreement information and are ignored. Items may have
    different numbers of raters (each item's agreement is computed with its own n_i), which reduces
    to Fleiss (1971) when every item has the same number. Returns NaN when undefined (no usable
    item, or every rating in one category). Ours because statsmodels' ``fleiss_kappa`` requires the
    same number of raters for every item, which a reader study rarely has; the tests check that both
    agree where statsmodels applies.
    """
    rows = [[int(c) for c in row] for row in counts if sum(row) >= 2]
    if not rows:
        return float("nan")
    total = sum(sum(row) for row in rows)
    k = len(rows[0])
    p_j = [sum(row[j] for row in rows) / total for j in range(k)]
    p_items = [(sum(c * c for c in row) - sum(row)) / (sum(row) * (sum(row) - 1)) for row in rows]
    p_bar = sum(p_items) / len(p_items)
    p_e = sum(p * p for p in p_j)
    if math.isclose(p_e, 1.0):
        return float("nan")
    return (p_bar - p_e) / (1 - p_e)


def csv_cell(value: object) -> object:
    """A text cell that a spreadsheet would take for a formula gets a leading single quote (OWASP's
    CSV-injection advice); numbers and other text are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class RatingsStore:
    """The ratings of one reader study in an SQLite file (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise CxrlensError(f"cannot open ratings database {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        # a fresh connection per call: safe from any thread, and SQLite serialises writers
        return sqlite3.connect(self.path, timeout=10)

    def add(self, rater: str, image_id: str, cls: str, ratings: Iterable[tuple[str, str, int]]) -> int:
        """Store scores ``(model, method, score)`` of one rater for one image; returns how many."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rows = []
        for model, method, score in ratings:
            if score not in SCORES:
                raise CxrlensError(f"score must be an integer 1-5, got {score!r}")
            rows.append((rater, now, image_id, cls, model, method, int(score)))
        with self._connect() as db:
            db.executemany(
                "INSERT INTO ratings (rater, time, image_id, cls, model, method, score) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rater, image_id, cls, model, method) DO UPDATE SET score = excluded.score, "
                "time = excluded.time",
                rows,
            )
        return len(rows)

    def rows(self) -> list[dict]:
        with self._connect() as db:
            cursor = db.execute(f"SELECT {', '.join(CSV_COLUMNS)} FROM ratings ORDER BY id")
            return [dict(zip(CSV_COLUMNS, r, strict=True)) for r in cursor.fetchall()]

    def rated_images(self, rater: str) -> set[str]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT DISTINCT image_id FROM ratings WHERE rater = ?", (rater,))}

    def to_csv(self) -> str:
        """Every rating as CSV, safe to open in a spreadsheet (see :func:`csv_cell`)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in self.rows())
        return buffer.getvalue()

    def summary(self) -> dict:
        """Counts, Fleiss' kappa over maps rated by two or more raters, mean score per model, method
        and model x method."""
        return summarise(self.rows())


def _means(rows: list[dict], key) -> dict[str, dict]:
    groups: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r["score"])
    out = {}
    for name, scores in sorted(groups.items()):
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else float("nan")
        out[name] = {"mean": mean, "sd": sd, "n": len(scores)}
    return out


def summarise(rows: list[dict]) -> dict:
    """The reader-study summary of a list of rating rows (as :meth:`RatingsStore.rows` returns)."""
    items: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(SCORES))
    for r in rows:
        items[(r["image_id"], r["cls"], r["model"], r["method"])][r["score"] - 1] += 1
    shared = [c for c in items.values() if sum(c) >= 2]
    return {
        "n_ratings": len(rows),
        "raters": sorted({r["rater"] for r in rows}),
        "n_images": len({r["image_id"] for r in rows}),
        "n_maps": len(items),
        "n_maps_multi_rated": len(shared),
        "fleiss_kappa": fleiss_kappa(shared) if shared else float("nan"),
        "by_model": _means(rows, lambda r: r["model"]),
        "by_method": _means(rows, lambda r: r["method"]),
        "by_model_method": _means(rows, lambda r: f"{r['model']} / {r['method']}"),
    }
