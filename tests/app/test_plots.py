"""SVG charts: well-formed XML, escaped labels, correct scales, robust to odd inputs."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from app.core.plots import (
    Bar,
    bar_chart,
    format_number,
    group_metric_series,
    line_chart,
    linear_scale,
    nice_ticks,
    small_multiples,
)

NS = {"svg": "http://www.w3.org/2000/svg"}
EVIL = "<script>alert(\"x\")</script> & 'q'"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def test_linear_scale_maps_ends_and_middle() -> None:
    scale = linear_scale((0.0, 10.0), (100.0, 200.0))
    assert scale(0) == 100 and scale(10) == 200 and scale(5) == 150
    flipped = linear_scale((0.0, 4.0), (200.0, 0.0))  # y axes grow downwards in SVG
    assert flipped(1) == 150
    assert linear_scale((3.0, 3.0), (0.0, 10.0))(3.0) == 5.0


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0, 10, [0, 2.5, 5, 7.5, 10]),
        (0, 1, [0, 0.25, 0.5, 0.75, 1]),
        (3, 97, [0, 25, 50, 75, 100]),
        (950, 1050, [950, 975, 1000, 1025, 1050]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_range(
    low: float, high: float, expected: list[float]
) -> None:
    ticks = nice_ticks(low, high, 5)
    assert ticks == expected
    assert ticks[0] <= low and ticks[-1] >= high


def test_nice_ticks_of_a_constant_or_reversed_or_bad_range() -> None:
    ticks = nice_ticks(5, 5)
    assert ticks[0] < 5 < ticks[-1]
    assert nice_ticks(10, 0) == nice_ticks(0, 10)
    assert nice_ticks(math.nan, 1) == [0.0, 1.0]


def test_format_number() -> None:
    assert format_number(0) == "0"
    assert format_number(1234.4) == "1234"
    assert format_number(0.125) == "0.125"
    assert format_number(2.5) == "2.5"
    assert format_number(1e-5) == "1e-05"


def test_line_chart_is_well_formed_and_scales_points() -> None:
    svg = line_chart({"loss": [[0, 1.0], [5, 0.5], [10, 0.0]]}, title="loss", width=400, height=200)
    root = parse(svg)
    assert root.get("viewBox") == "0 0 400 200"
    (line,) = root.findall("svg:polyline", NS)
    points = [tuple(map(float, p.split(","))) for p in line.get("points", "").split()]
    xs, ys = zip(*points, strict=True)
    # Evenly spaced steps are evenly spaced on screen; the lowest loss is drawn lowest... in
    # SVG coordinates that is the largest y.
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])
    assert ys[0] < ys[1] < ys[2]
    assert ys[1] == pytest.approx((ys[0] + ys[2]) / 2)
    assert root.find("svg:title", NS).text == "loss"  # type: ignore[union-attr]


def test_line_chart_escapes_labels_and_series_names() -> None:
    svg = line_chart({EVIL: [[0, 1], [1, 2]], "b": [[0, 2], [1, 1]]}, title=EVIL, y_label=EVIL)
    root = parse(svg)
    assert "<script>" not in svg
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert EVIL in texts  # the legend and the title show the label as text
    assert root.get("aria-label") == EVIL
    assert {p.get("data-series") for p in root.findall("svg:polyline", NS)} == {EVIL, "b"}


def test_line_chart_skips_bad_values_and_handles_empty_and_single_points() -> None:
    svg = line_chart({"a": [[0, 1], [1, math.nan], [2, None], [3, math.inf], [4, 2]]})
    (line,) = parse(svg).findall("svg:polyline", NS)
    assert len(line.get("points", "").split()) == 2
    empty = parse(line_chart({}, title="t"))
    assert "no data" in "".join(empty.itertext())
    single = parse(line_chart({"a": [[3, 3]]}))
    assert len(single.findall("svg:circle", NS)) == 1


def test_bar_chart_bars_and_interval_whiskers() -> None:
    bars = [
        Bar("best", 1100, 1050, 1150),
        Bar("worst", 900, 850, 950),
        Bar(EVIL, 1000),
    ]
    svg = bar_chart(bars, title="Leaderboard", width=500, baseline=None)
    root = parse(svg)
    assert "<script>" not in svg
    groups = root.findall("svg:g", NS)
    assert [g.get("data-label") for g in groups] == ["best", "worst", EVIL]
    rects = [g.find("svg:rect", NS) for g in groups]
    # Without a baseline, bars grow from the axis minimum, so their lengths keep the order of the
    # values.
    widths = [float(r.get("width")) for r in rects]  # type: ignore[union-attr, arg-type]
    assert widths[0] > widths[2] > widths[1]
    whiskers = groups[0].findall("svg:line", NS)
    assert len(whiskers) == 3
    low_x, high_x = float(whiskers[0].get("x1")), float(whiskers[0].get("x2"))  # type: ignore[arg-type]
    right_end = float(rects[0].get("x")) + widths[0]  # type: ignore[union-attr, arg-type]
    assert low_x < right_end < high_x
    assert right_end - low_x == pytest.approx(high_x - right_end, abs=0.02)
    assert not groups[2].findall("svg:line", NS)  # no interval, no whisker


def test_bar_chart_counts_start_at_zero_and_scale_proportionally() -> None:
    root = parse(bar_chart([Bar("a", 10), Bar("b", 5), Bar("c", 0)]))
    rects = [g.find("svg:rect", NS) for g in root.findall("svg:g", NS)]
    widths = [float(r.get("width")) for r in rects]  # type: ignore[union-attr, arg-type]
    assert widths[0] == pytest.approx(2 * widths[1], rel=0.01)
    assert {float(r.get("x")) for r in rects} == {float(rects[0].get("x"))}  # type: ignore[union-attr, arg-type]
    assert "no data" in "".join(parse(bar_chart([Bar("x", math.nan)])).itertext())


def test_small_multiples_nest_one_chart_per_panel() -> None:
    panels = group_metric_series(
        {
            "loss": [[1, 0.7], [2, 0.6]],
            "implicit_acc": [[1, 0.5], [2, 0.6]],
            "model_err_w": [[1, 0.2], [2, 0.1]],
            "model_err_l": [[1, 0.2], [2, 0.3]],
            "lonely_w": [[1, 1], [2, 2]],
        }
    )
    assert set(panels) == {"loss", "implicit_acc", "model_err (winner / loser)", "lonely_w"}
    assert list(panels["model_err (winner / loser)"]) == ["winner", "loser"]
    root = parse(small_multiples(panels, columns=2, panel_width=300, panel_height=150))
    assert root.get("viewBox") == "0 0 600 300"
    inner = root.findall("svg:svg", NS)
    assert len(inner) == 4
    assert {(c.get("x"), c.get("y")) for c in inner} == {
        ("0", "0"),
        ("300", "0"),
        ("0", "150"),
        ("300", "150"),
    }
    assert "no metrics" in "".join(parse(small_multiples({})).itertext())


def test_bar_chart_diverges_from_a_baseline_inside_the_range() -> None:
    root = parse(bar_chart([Bar("up", 1100), Bar("down", 900)], baseline=1000))
    up, down = (g.find("svg:rect", NS) for g in root.findall("svg:g", NS))
    # The "down" bar ends where the "up" bar starts: at the baseline, and both are as long.
    assert float(down.get("x")) + float(down.get("width")) == pytest.approx(float(up.get("x")))  # type: ignore[union-attr, arg-type]
    assert float(up.get("width")) == pytest.approx(float(down.get("width")))  # type: ignore[union-attr, arg-type]


def test_line_chart_explicit_ticks_and_labels() -> None:
    svg = line_chart({"v": [[-3, 1], [0, 2]]}, x_ticks=[-6, -3, 0], x_format=lambda t: f"h{int(t)}")
    ticks = [t.text for t in parse(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert {"h-6", "h-3", "h0"} <= set(ticks)
    # Data beyond the explicit ticks stays inside the plot (right of the y axis).
    root = parse(line_chart({"v": [[-47, 1], [0, 2]]}, x_ticks=[-42, 0], width=400))
    axis_x = float(root.find("svg:line", NS).get("x1"))  # type: ignore[union-attr, arg-type]
    (line,) = root.findall("svg:polyline", NS)
    xs = [float(p.split(",")[0]) for p in line.get("points", "").split()]
    assert min(xs) >= axis_x and max(xs) <= 400


def test_tick_labels_never_repeat() -> None:
    from app.core.plots import tick_labels

    ticks = nice_ticks(100, 101)  # steps of 0.25 around 100: "100" five times if rounded
    assert ticks == [100, 100.25, 100.5, 100.75, 101]
    assert tick_labels(ticks) == ["100.00", "100.25", "100.50", "100.75", "101.00"]
    assert tick_labels([0, 0.5, 1]) == ["0", "0.5", "1"]  # already exact: unchanged
    assert tick_labels([0, 0.0005, 0.001]) == ["0", "0.0005", "0.001"]


def test_integer_ticks_for_steps_and_counts() -> None:
    assert nice_ticks(1, 3, 6) == [1, 1.5, 2, 2.5, 3]
    assert nice_ticks(1, 3, 6, integer=True) == [1, 2, 3]
    assert nice_ticks(0, 25, 5, integer=True) == [0, 10, 20, 30]
    assert nice_ticks(4, 4, integer=True) == [3, 4, 5]
    svg = line_chart({"loss": [[1, 0.5], [2, 0.4], [3, 0.45]]})
    x_labels = [t.text for t in parse(svg).iter(f"{{{NS['svg']}}}text") if t.get("y") == "220"]
    assert x_labels == ["1", "2", "3"]


def test_lines_stay_inside_their_axes() -> None:
    series = {"a": [[k, (-1) ** k * k * k * 1.37] for k in range(1, 40)], "b": [[3, 1e-3]]}
    root = parse(line_chart(series, width=400, height=200))
    axes = [line for line in root.iter(f"{{{NS['svg']}}}line") if line.get("class") == "axis"]
    x0 = min(float(a.get("x1")) for a in axes)
    x1 = max(float(a.get("x2")) for a in axes)
    y0 = min(float(a.get("y1")) for a in axes)
    y1 = max(float(a.get("y2")) for a in axes)
    polyline = root.find("svg:polyline", NS)
    assert polyline is not None
    for pair in polyline.get("points", "").split():
        x, y = (float(v) for v in pair.split(","))
        assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)


def test_the_step_is_not_plotted_against_itself() -> None:
    panels = group_metric_series({"step": [[1, 1], [2, 2]], "loss": [[1, 0.7], [2, 0.6]]})
    assert set(panels) == {"loss"}
