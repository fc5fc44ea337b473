#!/usr/bin/env python3
"""Plots a `barrage-load connect` JSON report as SVG: gateway RSS and kernel slab growth (and the
load generator's RSS) against connections held, sampled once a second during the ramp and hold.
The slope of each line is its cost per connection. No dependencies beyond the standard library.

Usage: plot.py REPORT.json OUT.svg
"""
import json
import sys

W, H = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 40, 60, 70


def main():
    report = json.load(open(sys.argv[1]))
    samples = report.get("samples", [])
    if not samples:
        sys.exit("plot.py: no samples in the report")
    slab0 = report.get("slab_before_bytes") or samples[0].get("slab_bytes", 0)
    rss0 = report.get("gateway_rss_before_bytes") or samples[0].get("gateway_rss_bytes", 0)
    xs = [s.get("open", 0) for s in samples]
    series = [
        ("kernel slab growth (both ends)", "#c0392b", [max(0, s.get("slab_bytes", 0) - slab0) for s in samples]),
        ("gateway RSS growth", "#2471a3", [max(0, s.get("gateway_rss_bytes", 0) - rss0) for s in samples]),
        ("load generator RSS", "#7d8c8d", [s.get("loadgen_rss_bytes", 0) for s in samples]),
    ]
    xmax = max(max(xs), 1)
    ymax = max(max(v) for _, _, v in series) or 1
    ymax = nice(ymax / 2**30)

    def px(x):
        return LEFT + (W - LEFT - RIGHT) * x / xmax

    def py(y_gib):
        return H - BOTTOM - (H - TOP - BOTTOM) * y_gib / ymax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="13">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    title = (f"barrage: {report.get('connections_held', 0):,} connections held — "
             f"gateway {report.get('gateway_bytes_per_conn', 0):.0f} B/conn, "
             f"kernel {report.get('kernel_bytes_per_pair', 0):.0f} B/pair")
    out.append(f'<text x="{W/2}" y="28" text-anchor="middle" font-size="16">{title}</text>')
    for i in range(6):
        y = ymax * i / 5
        out.append(f'<line x1="{LEFT}" x2="{W-RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT-8}" y="{py(y)+4:.1f}" text-anchor="end">{y:.1f}</text>')
        x = xmax * i / 5
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" y2="{H-BOTTOM}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{H-BOTTOM+18}" text-anchor="middle">{x/1000:,.0f}k</text>')
    out.append(f'<text x="{(LEFT+W-RIGHT)/2}" y="{H-20}" text-anchor="middle">connections held</text>')
    out.append(f'<text x="20" y="{(TOP+H-BOTTOM)/2}" transform="rotate(-90 20 {(TOP+H-BOTTOM)/2})" '
               f'text-anchor="middle">memory (GiB)</text>')
    for k, (name, colour, ys) in enumerate(series):
        pts = " ".join(f"{px(x):.1f},{py(y / 2**30):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        ly = TOP + 10 + 18 * k
        out.append(f'<line x1="{LEFT+16}" x2="{LEFT+40}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{LEFT+48}" y="{ly+4}">{name}</text>')
    out.append("</svg>")
    open(sys.argv[2], "w").write("\n".join(out) + "\n")


def nice(v):
    """The next round number above v for an axis."""
    for step in (0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100):
        if v <= step:
            return step
    return v


if __name__ == "__main__":
    main()
