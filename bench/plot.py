#!/usr/bin/env python3
"""Plots a `barrage-load connect` JSON report as SVG: kernel slab growth (left axis, GiB) and the
gateway's and load generator's RSS growth (right axis, MiB) against connections held, sampled once
a second during the ramp and hold (the probe's delivery buffers are not idle cost and are left
out). The slope of each line is its cost per connection. Standard library only.

Usage: plot.py REPORT.json OUT.svg
"""
import json
import sys

W, H = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 70, 60, 70


def main():
    report = json.load(open(sys.argv[1]))
    samples = [s for s in report.get("samples", []) if s.get("phase", "") != "probe" and not s.get("reached")]
    if not samples:
        sys.exit("plot.py: no samples in the report")
    slab0 = report.get("slab_before_bytes") or samples[0].get("slab_bytes", 0)
    rss0 = report.get("gateway_rss_before_bytes") or samples[0].get("gateway_rss_bytes", 0)
    xs = [s.get("open", 0) for s in samples]
    kernel = [max(0, s.get("slab_bytes", 0) - slab0) / 2**30 for s in samples]
    user = [
        ("gateway RSS growth (MiB, right)", "#2471a3", [max(0, s.get("gateway_rss_bytes", 0) - rss0) / 2**20 for s in samples]),
        ("load generator RSS (MiB, right)", "#7d8c8d", [s.get("loadgen_rss_bytes", 0) / 2**20 for s in samples]),
    ]
    xmax = max(max(xs), 1)
    kmax = nice(max(kernel) or 1)
    umax = nice(max(max(v) for _, _, v in user) or 1)

    def px(x):
        return LEFT + (W - LEFT - RIGHT) * x / xmax

    def py(y, top):
        return H - BOTTOM - (H - TOP - BOTTOM) * y / top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="13">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    title = (f"barrage: {report.get('connections_held', 0):,} connections held — "
             f"gateway {report.get('gateway_bytes_per_conn', 0):.0f} B/conn, "
             f"kernel {report.get('kernel_bytes_per_pair', 0):.0f} B/pair")
    out.append(f'<text x="{W/2}" y="28" text-anchor="middle" font-size="16">{title}</text>')
    for i in range(6):
        yk, yu = kmax * i / 5, umax * i / 5
        out.append(f'<line x1="{LEFT}" x2="{W-RIGHT}" y1="{py(yk, kmax):.1f}" y2="{py(yk, kmax):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT-8}" y="{py(yk, kmax)+4:.1f}" text-anchor="end" fill="#c0392b">{yk:.1f}</text>')
        out.append(f'<text x="{W-RIGHT+8}" y="{py(yu, umax)+4:.1f}" fill="#2471a3">{yu:.0f}</text>')
        x = xmax * i / 5
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" y2="{H-BOTTOM}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{H-BOTTOM+18}" text-anchor="middle">{x/1000:,.0f}k</text>')
    out.append(f'<text x="{(LEFT+W-RIGHT)/2}" y="{H-20}" text-anchor="middle">connections held</text>')
    mid = (TOP + H - BOTTOM) / 2
    out.append(f'<text x="20" y="{mid}" transform="rotate(-90 20 {mid})" text-anchor="middle" fill="#c0392b">kernel (GiB)</text>')
    out.append(f'<text x="{W-12}" y="{mid}" transform="rotate(90 {W-12} {mid})" text-anchor="middle" fill="#2471a3">user space (MiB)</text>')
    lines = [("kernel slab growth, both ends (GiB, left)", "#c0392b", kernel, kmax)] + [(n, c, v, umax) for n, c, v in user]
    for k, (name, colour, ys, top) in enumerate(lines):
        pts = " ".join(f"{px(x):.1f},{py(y, top):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        ly = TOP + 10 + 18 * k
        out.append(f'<line x1="{LEFT+16}" x2="{LEFT+40}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{LEFT+48}" y="{ly+4}">{name}</text>')
    out.append("</svg>")
    open(sys.argv[2], "w").write("\n".join(out) + "\n")


def nice(v):
    """The next round number above v for an axis."""
    for step in (0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000):
        if v <= step:
            return step
    return v


if __name__ == "__main__":
    main()
