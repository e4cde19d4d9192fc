"""Server-rendered SVG charts: line charts, bar charts with interval bars, small multiples.

Pure functions from numbers to SVG markup (no external libraries, no scripts): every label is
escaped, every chart has a fixed viewBox and scales to its container through CSS. Values that
are None, NaN or infinite are left out instead of breaking the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import TypeGuard

# Colour-blind-safe palette (Okabe–Ito).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000")
SVG_NS = "http://www.w3.org/2000/svg"

Point = tuple[float, float]


@dataclass(frozen=True)
class Bar:
    """One bar: a value with an optional interval [low, high] drawn as a whisker."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float) -> str:
    """Coordinates with two decimals at most: small markup, exact enough for pixels."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_number(value: float) -> str:
    """A short human label for an axis tick or a value."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10_000 or magnitude < 0.001:
        return f"{value:.2g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.3g}"
    return f"{value:.3f}".rstrip("0")


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels for ticks that read back as the ticks themselves (so no two read the same)."""

    def exact(labels: list[str]) -> bool:
        try:
            return all(
                abs(float(label) - t) <= 1e-9 * max(1.0, abs(t))
                for label, t in zip(labels, ticks, strict=True)
            )
        except ValueError:
            return False

    labels = [format_number(t) for t in ticks]
    if exact(labels):
        return labels
    for decimals in range(0, 11):
        fixed = [f"{t:.{decimals}f}" for t in ticks]
        if exact(fixed):
            return fixed
    return labels


def nice_ticks(low: float, high: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k steps) covering [low, high].

    integer: whole-number steps only (steps, counts), never 2.5 × 10^k below 10.
    """
    if not (_finite(low) and _finite(high)):
        return [0.0, 1.0]
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        if integer:
            pad = max(1.0, math.ceil(pad))
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    exponent = math.floor(math.log10(raw))
    step = 10.0**exponent
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = factor * 10.0**exponent
        if integer and (candidate < 1 or candidate != math.floor(candidate)):
            continue
        if candidate >= raw:
            step = candidate
            break
    if integer:
        step = max(1.0, step)
    start = math.floor(low / step) * step
    ticks: list[float] = []
    value = start
    # Up to the first tick at or past high: the ticks cover the whole range.
    while len(ticks) < 1000:
        ticks.append(round(value, 10))
        if value >= high - step * 1e-9:
            break
        value += step
    return ticks


def linear_scale(
    domain: tuple[float, float], span: tuple[float, float]
) -> Callable[[float], float]:
    """Maps domain linearly onto span (a zero-width domain maps to the span's middle)."""
    d0, d1 = domain
    r0, r1 = span
    width = d1 - d0

    def scale(value: float) -> float:
        if width == 0:
            return (r0 + r1) / 2
        return r0 + (value - d0) / width * (r1 - r0)

    return scale


def _open(width: int, height: int, title: str, css_class: str) -> list[str]:
    label = escape(title, quote=True)
    return [
        f'<svg xmlns="{SVG_NS}" class="chart {css_class}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{label}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
    ]


def _empty(width: int, height: int, title: str, css_class: str, message: str) -> str:
    parts = _open(width, height, title, css_class)
    parts.append(
        f'<text class="empty" x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
        f"{escape(message)}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _clean(points: Iterable[Sequence[object]]) -> list[Point]:
    out = []
    for point in points:
        if len(point) < 2:
            continue
        x, y = point[0], point[1]
        if _finite(x) and _finite(y):
            out.append((float(x), float(y)))
    out.sort(key=lambda p: p[0])
    return out


def line_chart(
    series: Mapping[str, Iterable[Sequence[object]]],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    width: int = 560,
    height: int = 240,
    x_format: Callable[[float], str] | None = None,
    x_ticks: Sequence[float] | None = None,
) -> str:
    """Lines of (x, y) points, one per series, with axes, ticks and a legend.

    x_format turns an x tick into its label (e.g. an hour offset into a clock time); x_ticks
    replaces the automatic ticks (their ends become the axis ends).
    """
    clean = {name: _clean(points) for name, points in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    if not clean:
        return _empty(width, height, title, "line-chart", "no data yet")
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    whole_xs = all(x == math.floor(x) for x in xs)
    x_ticks = sorted(x_ticks) if x_ticks else nice_ticks(min(xs), max(xs), 6, integer=whole_xs)
    y_ticks = nice_ticks(min(ys), max(ys), 5, integer=all(y == math.floor(y) for y in ys))
    left, right, top = 52, 24, 26 if title else 10
    legend_rows = 1 if len(clean) > 1 else 0
    bottom = 34 + (14 if x_label else 0) + 16 * legend_rows
    # Explicit ticks may not reach the data's ends: the axis spans both.
    x_domain = (min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs)))
    sx = linear_scale(x_domain, (left, width - right))
    # The axes span the ticks and the data alike: no line leaves its axes.
    sy = linear_scale((min(y_ticks[0], min(ys)), max(y_ticks[-1], max(ys))), (height - bottom, top))
    parts = _open(width, height, title, "line-chart")
    if title:
        parts.append(f'<text class="title" x="{left}" y="16">{escape(title)}</text>')
    parts.extend(_axes(left, width - right, top, height - bottom))
    for tick, tick_label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        at = _fmt(sy(tick))
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{at}" y2="{at}"/>'
            f'<text class="tick" x="{left - 4}" y="{at}" text-anchor="end" '
            f'dominant-baseline="middle">{escape(tick_label)}</text>'
        )
    for tick, tick_label in zip(x_ticks, tick_labels(x_ticks), strict=True):
        at = _fmt(sx(tick))
        label = x_format(tick) if x_format else tick_label
        parts.append(
            f'<text class="tick" x="{at}" y="{height - bottom + 14}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
    if x_label:
        parts.append(
            f'<text class="axis-label" x="{(left + width - right) / 2:.0f}" '
            f'y="{height - bottom + 28}" text-anchor="middle">{escape(x_label)}</text>'
        )
    if y_label:
        parts.append(
            f'<text class="axis-label" x="12" y="{(top + height - bottom) / 2:.0f}" '
            f'text-anchor="middle" transform="rotate(-90 12 {(top + height - bottom) / 2:.0f})">'
            f"{escape(y_label)}</text>"
        )
    for index, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[index % len(PALETTE)]
        label = escape(name, quote=True)
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(
                f'<circle class="series" data-series="{label}" cx="{_fmt(sx(x))}" '
                f'cy="{_fmt(sy(y))}" r="3" fill="{colour}"/>'
            )
        else:
            path = " ".join(f"{_fmt(sx(x))},{_fmt(sy(y))}" for x, y in pts)
            parts.append(
                f'<polyline class="series" data-series="{label}" fill="none" '
                f'stroke="{colour}" stroke-width="2" points="{path}"/>'
            )
    if legend_rows:
        x = left
        y = height - 6
        for index, name in enumerate(clean):
            colour = PALETTE[index % len(PALETTE)]
            parts.append(
                f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
                f'<text class="legend" x="{x + 14}" y="{y}">{escape(name)}</text>'
            )
            x += 24 + 7 * min(len(name), 30)
    parts.append("</svg>")
    return "".join(parts)


def _axes(x0: float, x1: float, y0: float, y1: float) -> list[str]:
    return [
        f'<line class="axis" x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}"/>',
        f'<line class="axis" x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}"/>',
    ]


def bar_chart(
    bars: Sequence[Bar],
    *,
    title: str = "",
    value_label: str = "",
    width: int = 560,
    row_height: int = 26,
    baseline: float | None = 0.0,
    show_values: bool = True,
) -> str:
    """Horizontal bars, one row per label, with interval whiskers where low/high are given.

    Bars grow from baseline (None: the axis minimum). Counts start at 0; ratings on an Elo
    scale are better drawn from their mean, as they mean something only relative to each other.
    """
    usable = [b for b in bars if _finite(b.value)]
    if not usable:
        return _empty(width, 80, title, "bar-chart", "no data yet")
    values = [b.value for b in usable]
    for b in usable:
        values.extend(v for v in (b.low, b.high) if v is not None and _finite(v))
    lo, hi = min(values), max(values)
    if baseline is not None:
        lo, hi = min(lo, baseline), max(hi, baseline)
    ticks = nice_ticks(lo, hi, 5)
    label_width = min(200, 16 + 7 * max(len(b.label) for b in usable))
    left, right = label_width, 56 if show_values else 16
    top = 26 if title else 8
    bottom = 28 + (14 if value_label else 0)
    height = top + bottom + row_height * len(usable)
    sx = linear_scale((ticks[0], ticks[-1]), (left, width - right))
    base = ticks[0] if baseline is None else baseline
    parts = _open(width, height, title, "bar-chart")
    if title:
        parts.append(f'<text class="title" x="8" y="16">{escape(title)}</text>')
    plot_bottom = height - bottom
    for tick in ticks:
        x = _fmt(sx(tick))
        parts.append(
            f'<line class="grid" x1="{x}" x2="{x}" y1="{top}" y2="{plot_bottom}"/>'
            f'<text class="tick" x="{x}" y="{plot_bottom + 14}" text-anchor="middle">'
            f"{escape(format_number(tick))}</text>"
        )
    if value_label:
        parts.append(
            f'<text class="axis-label" x="{(left + width - right) / 2:.0f}" '
            f'y="{plot_bottom + 28}" text-anchor="middle">{escape(value_label)}</text>'
        )
    for index, bar in enumerate(usable):
        y = top + index * row_height
        mid = y + row_height / 2
        x0, x1 = sorted((sx(base), sx(bar.value)))
        label = escape(bar.label, quote=True)
        parts.append(
            f'<g class="bar" data-label="{label}" data-value="{_fmt(bar.value)}">'
            f'<text class="bar-label" x="{left - 6}" y="{_fmt(mid)}" text-anchor="end" '
            f'dominant-baseline="middle">{escape(bar.label)}</text>'
            f'<rect x="{_fmt(x0)}" y="{_fmt(y + 4)}" width="{_fmt(max(x1 - x0, 1))}" '
            f'height="{row_height - 8}" fill="{PALETTE[0]}" fill-opacity="0.75"/>'
        )
        if _finite(bar.low) and _finite(bar.high):
            wl, wh = _fmt(sx(bar.low)), _fmt(sx(bar.high))
            parts.append(
                f'<line class="interval" x1="{wl}" x2="{wh}" y1="{_fmt(mid)}" y2="{_fmt(mid)}" '
                f'stroke="#222" stroke-width="1.5"/>'
                f'<line class="interval" x1="{wl}" x2="{wl}" y1="{_fmt(mid - 6)}" '
                f'y2="{_fmt(mid + 6)}" stroke="#222" stroke-width="1.5"/>'
                f'<line class="interval" x1="{wh}" x2="{wh}" y1="{_fmt(mid - 6)}" '
                f'y2="{_fmt(mid + 6)}" stroke="#222" stroke-width="1.5"/>'
            )
        if show_values:
            parts.append(
                f'<text class="bar-value" x="{width - right + 6}" y="{_fmt(mid)}" '
                f'dominant-baseline="middle">{escape(format_number(bar.value))}</text>'
            )
        parts.append("</g>")
    parts.append(
        f'<line class="axis" x1="{_fmt(sx(base))}" x2="{_fmt(sx(base))}" y1="{top}" '
        f'y2="{plot_bottom}"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def small_multiples(
    panels: Mapping[str, Mapping[str, Iterable[Sequence[object]]]],
    *,
    columns: int = 2,
    panel_width: int = 300,
    panel_height: int = 170,
    x_label: str = "step",
) -> str:
    """A grid of small line charts, one per panel (each panel may hold several series)."""
    if not panels:
        return _empty(panel_width, panel_height, "metrics", "small-multiples", "no metrics yet")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    width, height = columns * panel_width, rows * panel_height
    parts = _open(width, height, "metrics: " + ", ".join(panels), "small-multiples")
    for index, (name, series) in enumerate(panels.items()):
        x = (index % columns) * panel_width
        y = (index // columns) * panel_height
        inner = line_chart(
            series, title=name, x_label=x_label, width=panel_width, height=panel_height
        )
        # A nested <svg> positions a whole chart; its own viewBox keeps its coordinates.
        inner = inner.replace(
            "<svg ",
            f'<svg x="{x}" y="{y}" width="{panel_width}" height="{panel_height}" ',
            1,
        )
        parts.append(inner)
    parts.append("</svg>")
    return "".join(parts)


# Metric names that are the x axis itself (every panel is plotted against the step).
X_AXIS_NAMES = frozenset({"step", "global_step"})


def group_metric_series(
    metrics: Mapping[str, Sequence[Sequence[object]]],
) -> dict[str, dict[str, Sequence[Sequence[object]]]]:
    """Panels for a job's metric time series: winner/loser pairs (`x_w`, `x_l`) share a panel.

    Everything else gets a panel of its own, so whatever a job reports is plotted, except the
    step itself (X_AXIS_NAMES).
    """
    panels: dict[str, dict[str, Sequence[Sequence[object]]]] = {}
    for name in sorted(metrics):
        points = metrics[name]
        if not isinstance(points, Sequence) or isinstance(points, str):
            continue
        if name in X_AXIS_NAMES:
            continue  # the step reported as a metric: "step against step" says nothing
        stem, suffix = (name[:-2], name[-2:]) if name.endswith(("_w", "_l")) else (name, "")
        partner = stem + ("_l" if suffix == "_w" else "_w")
        if suffix and partner in metrics:
            panel = panels.setdefault(f"{stem} (winner / loser)", {})
            panel["winner" if suffix == "_w" else "loser"] = points
        else:
            panels[name] = {name: points}
    # Winner first in every shared panel, whatever the names' sort order.
    return {
        title: dict(sorted(series.items(), key=lambda item: item[0] != "winner"))
        for title, series in panels.items()
    }
