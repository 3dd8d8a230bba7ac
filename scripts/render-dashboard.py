#!/usr/bin/env python3
"""Draws a dashboard's panels as one PNG from the series tests/e2e/test_prometheus.py wrote
(KVFLOCK_DASHBOARD_DATA=FILE): the README's picture of kvflock / service on the local cluster.
Needs matplotlib, which the `test` extra installs (requirements/lock.txt pins it).

usage: render-dashboard.py DATA.json OUT.png
"""

import json
import math
import sys
from datetime import datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def main(data_path: str, out_path: str) -> None:
    data = json.loads(open(data_path).read())
    panels = data["panels"]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 2.8 * rows), facecolor="#111217", squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        for series in panel["series"]:
            points = [(datetime.fromtimestamp(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf")]
            if points:
                ax.plot(*zip(*points), label=series["label"][:30], linewidth=1.4)
        ax.set_title(f"{panel['title']}" + (f" ({panel['unit']})" if panel["unit"] else ""), color="#d8d9da",
                     fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.5)
        if len(panel["series"]) > 1:
            ax.legend(fontsize=6, facecolor="#181b1f", labelcolor="#d8d9da", framealpha=0.8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{data['title']} (local cluster, SmolLM2, Prometheus)", color="#d8d9da", x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=80, facecolor=fig.get_facecolor())


if __name__ == "__main__":
    main(*sys.argv[1:3])
