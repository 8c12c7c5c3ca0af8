"""Small, exact fitting helpers shared by the calibration stages (pure Python: no torch needed to fit)."""

from __future__ import annotations


def significant(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures: how profile files keep measured figures."""
    return float(f"{x:.{digits}g}")


def _least_squares(rows: list[list[float]], targets: list[float], columns: list[int]) -> dict[int, float]:
    """Unconstrained least squares over `columns` (normal equations, columns scaled to unit norm first; Gaussian
    elimination with partial pivoting). A column that adds nothing new gets 0."""
    norms = {j: sum(r[j] ** 2 for r in rows) ** 0.5 or 1.0 for j in columns}
    a = [[sum(r[i] * r[j] for r in rows) / (norms[i] * norms[j]) for j in columns]
         + [sum(r[i] * y for r, y in zip(rows, targets)) / norms[i]] for i in columns]
    n, solved = len(columns), [0.0] * len(columns)
    pivots = []
    for col in range(n):
        best = max(range(col, n), key=lambda i: abs(a[i][col]), default=col)
        if abs(a[best][col]) < 1e-12:
            continue                                # dependent on the columns before it
        a[col], a[best] = a[best], a[col]
        for i in range(n):
            if i != col and a[i][col]:
                f = a[i][col] / a[col][col]
                a[i] = [x - f * y for x, y in zip(a[i], a[col])]
        pivots.append(col)
    for col in pivots:
        solved[col] = a[col][n] / a[col][col]
    return {j: v / norms[j] for j, v in zip(columns, solved)}


def non_negative_least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """argmin |rows x - targets| subject to x >= 0 (Lawson and Hanson's active-set method, exact)."""
    n = len(rows[0]) if rows else 0
    x, passive = [0.0] * n, []

    def gradient() -> list[float]:
        residual = [y - sum(r[j] * x[j] for j in range(n)) for r, y in zip(rows, targets)]
        return [sum(r[j] * e for r, e in zip(rows, residual)) for j in range(n)]

    scale = max((abs(v) for r in rows for v in r), default=1.0) * max((abs(y) for y in targets), default=1.0)
    for _ in range(3 * n + 10):
        w = gradient()
        active = [j for j in range(n) if j not in passive]
        if not active or max(w[j] for j in active) <= 1e-12 * scale * len(rows):
            break
        passive.append(max(active, key=lambda j: w[j]))
        while True:
            s = _least_squares(rows, targets, passive)
            if all(s[j] > 0 for j in passive):
                break
            # step from x towards s until the first passive unknown reaches zero, and release it
            alpha = min(x[j] / (x[j] - s[j]) for j in passive if s[j] <= 0)
            x = [x[j] + alpha * (s.get(j, 0.0) - x[j]) if j in passive else 0.0 for j in range(n)]
            passive = [j for j in passive if x[j] > 1e-15 * max(abs(v) for v in x + [1.0])]
            if not passive:
                break
        x = [s.get(j, 0.0) if j in passive else 0.0 for j in range(n)]
    return x
