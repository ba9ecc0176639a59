"""A picture of the dashboard's panels: each panel's queries run over a time range on a
Prometheus (query_range), one plot per panel, written as a PNG. For the docs and for a quick
look without Grafana; needs matplotlib.

    python3 contrib/grafana/render_panels.py http://127.0.0.1:9090 out.png [minutes]
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).with_name("qmpfd-dashboard.json")
MACROS = {"$__rate_interval": "1m", "$__range": "10m"}


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.loads(resp.read())
    return list(body["data"]["result"])


def render(url: str, out: Path, minutes: float = 5.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = json.loads(DASHBOARD.read_text())["panels"]
    end = time.time()
    start = end - minutes * 60
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in query_range(url, target["expr"], start, end, 1):
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = target["legendFormat"]
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                ax.plot(xs, ys, label=label[:40])
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("qmpfd dashboard panels (seconds before now)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    render(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 5.0)
