"""Results over several seeds: each metric's mean, min and max, and whether two variants' spreads separate.

A benchmark run on one seed can point either way; a direction between two variants is only stated when their
per-seed values do not overlap at all (every seed of one above every seed of the other).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["separation", "spread"]


def spread(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key of the rows (every row has the same keys): mean, min and max over the rows, to 4 decimals."""
    if not rows:
        raise ValueError("expected at least one row, found none")
    keys = list(rows[0])
    if any(list(r) != keys for r in rows):
        raise ValueError(f"expected every row to have the keys {keys}")
    return {
        key: {
            "mean": round(sum(r[key] for r in rows) / len(rows), 4),
            "min": round(min(r[key] for r in rows), 4),
            "max": round(max(r[key] for r in rows), 4),
        }
        for key in keys
    }


def separation(a: Sequence[float], b: Sequence[float]) -> str:
    """``">"`` when every value of ``a`` is above every value of ``b``, ``"<"`` for the reverse, else ``"overlap"``
    (also with a single value on either side: one seed separates nothing)."""
    if len(a) < 2 or len(b) < 2:
        return "overlap"
    if min(a) > max(b):
        return ">"
    if max(a) < min(b):
        return "<"
    return "overlap"
