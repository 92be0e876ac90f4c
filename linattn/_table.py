"""The plain-text tables of linattn: the command line's (info, check, audit) and the benchmarks'."""

from collections.abc import Sequence


def table(rows: list[list[str]], right: Sequence[bool] = ()) -> str:
    """Rows of strings as aligned columns, the first row a header underlined with dashes.

    Column i is right-aligned where right[i] is true (numbers, compared down the column), else left-aligned.
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = [*right, *[False] * (len(widths) - len(right))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    lines = [line(r) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cell(value) -> str:
    """A value as a table cell: None as "-"; a float with 3 decimals below 10, 1 from 10 on, and in exponent
    notation outside [1e-3, 1e5); a dict as "key value; key value" (nested dicts alike)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.2e}"
    if isinstance(value, dict):
        return "; ".join(f"{k} {cell(v)}" for k, v in value.items())
    return str(value)


def dict_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """`rows` (dicts) as a table of `columns`: a missing value is "-", and a column of numbers (or missing
    values) is right-aligned."""
    numeric = [all(isinstance(row.get(col), (int, float, type(None))) for row in rows) for col in columns]
    return table([list(columns), *([cell(row.get(col)) for col in columns] for row in rows)], numeric)
