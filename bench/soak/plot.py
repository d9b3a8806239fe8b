#!/usr/bin/env python3
"""Plots a soak run: python3 plot.py OUT_DIR -> OUT_DIR/soak.png.

Reads timeline.csv (one line a second from loadgen), rss.csv (t, redfuse_kib, redis_kib)
and faults.csv (start, end, kind; seconds since the load began). Needs matplotlib.
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = sys.argv[1]


def rows(name):
    try:
        with open(f"{out}/{name}") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


timeline = rows("timeline.csv")
rss = rows("rss.csv")
faults = rows("faults.csv")

t = [float(r["t"]) for r in timeline]
error_classes = [
    c
    for c in (timeline[0].keys() if timeline else [])
    if c not in ("t", "requests", "p50_ms", "p99_ms", "max_ms")
]

fig, axes = plt.subplots(4, 1, figsize=(12, 12), sharex=True)
(ax_rps, ax_lat, ax_err, ax_mem) = axes

ax_rps.plot(t, [int(r["requests"]) for r in timeline], color="tab:blue")
ax_rps.set_ylabel("requests answered / s")



def latency(col):
    # A second in which nothing was answered has no latency (not 0).
    return [float(r[col]) if int(r["requests"]) else float("nan") for r in timeline]


ax_lat.plot(t, latency("p50_ms"), label="p50")
ax_lat.plot(t, latency("p99_ms"), label="p99")
ax_lat.plot(t, latency("max_ms"), label="max", alpha=0.5)
ax_lat.set_yscale("symlog", linthresh=1.0)
ax_lat.set_ylabel("latency ms (per second)")
ax_lat.legend(loc="upper right")

for c in error_classes:
    ys = [int(r[c]) for r in timeline]
    if any(ys):
        ax_err.plot(t, ys, label=c)
ax_err.set_ylabel("errors / s by class")
if ax_err.get_legend_handles_labels()[0]:
    ax_err.legend(loc="upper right", fontsize="small")

if rss:
    rt = [float(r["t"]) for r in rss]
    ax_mem.plot(rt, [int(r["redfuse_kib"]) / 1024 for r in rss], label="redfuse")
    ax_mem.plot(
        rt, [int(r["redis_kib"] or 0) / 1024 for r in rss], label="redis", alpha=0.6
    )
    ax_mem.legend(loc="upper right")
ax_mem.set_ylabel("RSS MiB")
ax_mem.set_xlabel("seconds since the load began")

colors = {
    "kill": "tab:red",
    "stop": "tab:purple",
    "blackhole": "black",
    "delay": "tab:orange",
}
for f in faults:
    for ax in axes:
        ax.axvspan(
            float(f["start"]),
            float(f["end"]),
            color=colors.get(f["kind"], "grey"),
            alpha=0.12,
        )
    ax_rps.annotate(
        f["kind"],
        (float(f["start"]), 0),
        xycoords=("data", "axes fraction"),
        fontsize="small",
        va="bottom",
    )

fig.suptitle("redfuse soak: mixed load with faults (shaded)")
fig.tight_layout()
fig.savefig(f"{out}/soak.png", dpi=90)
print(f"{out}/soak.png")
