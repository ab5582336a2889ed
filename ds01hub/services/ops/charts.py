"""The admin page's charts, from the event log's GPU intervals, drawn as inline SVG on the
server: no script, no external service or CDN (the page's Content-Security-Policy allows none),
and what the chart shows is in the HTML a test reads.

Pure: intervals in (`ds01hub.gpu.eventlog.Interval`), numbers and SVG text out. Every text in
an SVG is escaped (user and group names come from users). Each mark carries its number in
`data-*` attributes and a `<title>` (the tooltip), so a person hovering and a test reading the
page see the same figure the event log gives.

    week_starts(now, weeks) -> [Monday 00:00 UTC, ...]        oldest first, `now`'s week last
    weekly_hours(intervals, by, starts, now) -> {name: [hours per week]}
        = top_series(week_sums(...)); sums of disjoint interval sets add up (add_sums)
    slot_day(intervals, slots, until, hours=24) -> {slot: [share of each hour held, 0..1]}
        = slot_shares(slot_sums(intervals, slots, hour_starts(until, hours)))
    stacked_bars(series, labels, unit, title) -> "<svg ...>"
    heatmap(rows, labels, title) -> "<svg ...>"
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from html import escape
from typing import Any

__all__ = [
    "add_sums",
    "heatmap",
    "hour_starts",
    "slot_day",
    "slot_shares",
    "slot_sums",
    "stacked_bars",
    "top_series",
    "week_starts",
    "week_sums",
    "weekly_hours",
]

#: Colour-blind-safe palette (Okabe-Ito), one per series; the rest share "others".
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
OTHERS = "others"
_WIDTH, _HEIGHT, _LEFT, _BOTTOM, _TOP = 640, 220, 48, 28, 12


def week_starts(now: datetime, weeks: int = 8) -> list[datetime]:
    """The Mondays (00:00, `now`'s zone) of the last `weeks` weeks, oldest first."""
    monday = (now - timedelta(days=now.weekday())).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return [monday - timedelta(weeks=back) for back in range(weeks - 1, -1, -1)]


def _overlap(begin: datetime, end: datetime, start: datetime, stop: datetime) -> float:
    """Seconds of [begin, end] inside [start, stop]."""
    return max(0.0, (min(end, stop) - max(begin, start)).total_seconds())


def weekly_hours(
    intervals: Iterable[Any], by: str, starts: Sequence[datetime], now: datetime
) -> dict[str, list[float]]:
    """GPU-hours per user (or group) in each week that begins at `starts` (the last one ends
    at `now`), biggest total first; past `len(PALETTE)` names the rest are summed as 'others'."""
    return top_series(week_sums(intervals, by, starts, now))


def week_sums(
    intervals: Iterable[Any], by: str, starts: Sequence[datetime], now: datetime
) -> dict[str, list[float]]:
    """`weekly_hours` before ranking and rounding: sums of disjoint sets of intervals add up
    (`add_sums`), so a cache keeps the finished intervals' sums and adds the open ones."""
    ends = [*starts[1:], now]
    totals: dict[str, list[float]] = {}
    for interval in intervals:
        row = totals.setdefault(interval.key(by), [0.0] * len(starts))
        for index, (start, stop) in enumerate(zip(starts, ends, strict=True)):
            row[index] += _overlap(interval.begin, interval.end, start, stop) / 3600.0
    return totals


def top_series(totals: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Hours per name -> the chart's series: biggest total first, the names past
    `len(PALETTE)` summed as 'others', rounded, all-zero series left out."""
    ranked = sorted(totals.items(), key=lambda item: (-sum(item[1]), item[0]))
    shown = dict(ranked[: len(PALETTE)])
    rest = ranked[len(PALETTE) :]
    if rest:
        shown[OTHERS] = [sum(values) for values in zip(*(v for _, v in rest), strict=True)]
    return {name: [round(h, 2) for h in hours] for name, hours in shown.items() if any(hours)}


def add_sums(*parts: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Row-wise sums of `week_sums`/`slot_sums` results (of disjoint sets of intervals)."""
    total: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            row = total.setdefault(name, [0.0] * len(values))
            for index, value in enumerate(values):
                row[index] += value
    return total


def hour_starts(until: datetime, hours: int = 24) -> list[datetime]:
    """The starts of the last `hours` whole hours before `until` rounded up to the hour."""
    end = until.replace(minute=0, second=0, microsecond=0)
    if end < until:
        end += timedelta(hours=1)
    return [end - timedelta(hours=hours - i) for i in range(hours)]


def slot_day(
    intervals: Iterable[Any], slots: Sequence[str], until: datetime, hours: int = 24
) -> dict[str, list[float]]:
    """For each slot, the share (0..1) of each of the last `hours` whole hours before `until`
    (rounded up to the hour) that some container held it."""
    return slot_shares(slot_sums(intervals, slots, hour_starts(until, hours)))


def slot_sums(
    intervals: Iterable[Any], slots: Sequence[str], starts: Sequence[datetime]
) -> dict[str, list[float]]:
    """Seconds each slot was held in each hour beginning at `starts` (consecutive hours); an
    interval outside them costs one comparison, one inside only the hours it touches."""
    held: dict[str, list[float]] = {slot: [0.0] * len(starts) for slot in slots}
    if not starts:
        return held
    first, hour = starts[0], timedelta(hours=1)
    last = starts[-1] + hour
    for interval in intervals:
        row = held.get(interval.slot)
        if row is None or interval.end <= first or interval.begin >= last:
            continue  # a slot this machine no longer has, or outside the day
        begin = max(0, int((interval.begin - first) / hour))
        stop = min(len(starts), int((interval.end - first) / hour) + 1)
        for index in range(begin, stop):
            start = starts[index]
            row[index] += _overlap(interval.begin, interval.end, start, start + hour)
    return held


def slot_shares(held: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """`slot_sums` seconds -> the share (0..1, rounded) of each hour."""
    return {slot: [round(min(1.0, s / 3600.0), 3) for s in row] for slot, row in held.items()}


def _axis_top(value: float) -> float:
    """A round number at or above `value` for the y axis (1, 2, 5, 10, 20, 50, ...)."""
    step = 1.0
    while True:
        for factor in (1, 2, 5):
            if value <= step * factor:
                return step * factor
        step *= 10


def stacked_bars(
    series: Mapping[str, Sequence[float]], labels: Sequence[str], unit: str, title: str
) -> str:
    """One bar per label, stacked by series (a colour each, a legend below); each segment has
    `data-name`, `data-label`, `data-value` and a tooltip."""
    columns = len(labels)
    totals = [sum(values[i] for values in series.values()) for i in range(columns)]
    top = _axis_top(max(totals, default=0.0) or 1.0)
    legend_rows = (len(series) + 3) // 4
    height = _HEIGHT + 18 * legend_rows
    plot_h = _HEIGHT - _BOTTOM - _TOP
    slot_w = (_WIDTH - _LEFT - 8) / max(columns, 1)
    parts = [_open(height, title)]
    for tick in (0.0, top / 2, top):
        y = _TOP + plot_h * (1 - tick / top)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_WIDTH - 8}" y2="{y:.1f}" stroke="#ccc"/>'
            f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{tick:g}</text>"
        )
    for i, label in enumerate(labels):
        x = _LEFT + i * slot_w + slot_w * 0.15
        base = _TOP + plot_h
        for colour, (name, values) in zip(_colours(), series.items(), strict=False):
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            tip = f"{name}: {value:g} {unit} ({label})"
            parts.append(
                f'<rect class="ds01-bar" x="{x:.1f}" y="{base:.1f}" width="{slot_w * 0.7:.1f}" '
                f'height="{h:.1f}" fill="{colour}" data-name="{escape(name)}" '
                f'data-label="{escape(label)}" data-value="{value:g}">'
                f"<title>{escape(tip)}</title></rect>"
            )
        parts.append(
            f'<text x="{x + slot_w * 0.35:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{escape(label)}</text>'
        )
    for n, (colour, name) in enumerate(zip(_colours(), series, strict=False)):
        x, y = _LEFT + (n % 4) * 150, _HEIGHT + 18 * (n // 4)
        parts.append(
            f'<rect x="{x}" y="{y - 10}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="{y}" font-size="12">{escape(_short(name))}</text>'
        )
    if not series:
        parts.append(_nothing(plot_h))
    parts.append("</svg>")
    return "".join(parts)


def heatmap(rows: Mapping[str, Sequence[float]], labels: Sequence[str], title: str) -> str:
    """One row per slot, one cell per hour, darker = held longer; each cell has `data-slot`,
    `data-label`, `data-value` (the share held) and a tooltip."""
    columns = max((len(v) for v in rows.values()), default=len(labels))
    cell_h = 18
    height = _TOP + cell_h * max(len(rows), 1) + _BOTTOM
    cell_w = (_WIDTH - _LEFT - 8) / max(columns, 1)
    parts = [_open(height, title)]
    for r, (slot, values) in enumerate(rows.items()):
        y = _TOP + r * cell_h
        parts.append(
            f'<text x="{_LEFT - 4}" y="{y + 13}" text-anchor="end" font-size="11">'
            f"{escape(slot)}</text>"
        )
        for c, share in enumerate(values):
            label = labels[c] if c < len(labels) else str(c)
            tip = f"slot {slot}, {label}: {share:.0%} held"
            parts.append(
                f'<rect class="ds01-cell" x="{_LEFT + c * cell_w:.1f}" y="{y}" '
                f'width="{cell_w - 1:.1f}" height="{cell_h - 2}" fill="#0072B2" '
                f'fill-opacity="{0.08 + 0.92 * share:.2f}" data-slot="{escape(slot)}" '
                f'data-label="{escape(label)}" data-value="{share:g}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    bottom = _TOP + cell_h * max(len(rows), 1) + 14
    for c in range(0, columns, 3):
        if c < len(labels):
            parts.append(
                f'<text x="{_LEFT + c * cell_w:.1f}" y="{bottom}" font-size="11">'
                f"{escape(labels[c])}</text>"
            )
    if not rows:
        parts.append(_nothing(cell_h))
    parts.append("</svg>")
    return "".join(parts)


def _open(height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="ds01-chart" role="img" '
        f'viewBox="0 0 {_WIDTH} {height}" width="100%" style="max-width:{_WIDTH}px" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    )


def _nothing(height: int) -> str:
    return (
        f'<text x="{_WIDTH / 2}" y="{_TOP + height / 2}" text-anchor="middle" '
        'font-size="13" fill="#666">no GPU time recorded</text>'
    )


def _colours() -> Iterable[str]:
    yield from PALETTE
    yield "#999999"  # others


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
