"""A side-by-side result as Markdown (its table, the ratios, issue 12's targets) and as a plot: the figures of
`make compare` and the A/B measurements (perf/ab/), median [range] over the rounds."""

from __future__ import annotations

from pathlib import Path

from perf.reference.targets import verdicts


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "images_per_s", "images/s (one per request)"),
                           (axes[1], "p99_ms", "p99 latency (ms)")):
        names = [n for n in r["summary"] if key in r["summary"][n]]
        med = [r["summary"][n][key]["median"] for n in names]
        lo = [m - r["summary"][n][key]["min"] for m, n in zip(med, names, strict=True)]
        hi = [r["summary"][n][key]["max"] - m for m, n in zip(med, names, strict=True)]
        ax.bar(names, med, yerr=[lo, hi], capsize=6, color=[plt.cm.tab10(i) for i in range(len(names))])
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{r['generator']}, {r['connections']} connections, {r['rounds']} rounds of {r['seconds']:g} s "
                 "(median, bars: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(s: dict) -> str:
    """A median with its range in brackets."""
    return f"{s['median']:g} [{s['min']:g}–{s['max']:g}]"


def render_markdown(r: dict, heading: str = "#", image: str | None = "compare.png") -> str:
    """The comparison as Markdown: ``heading`` its level, ``image`` the plot's file (None: not shown)."""
    forms = ", ".join(f"{t['name']} {t['kind']}" for t in r["targets"])
    lines = [f"{heading} Side by side, one load generator", "",
             f"Measured {r.get('when', '')} with {r['generator']} ({r['threads']} threads, "
             f"{r['connections']} connections, "
             f"the same {r['images']} JPEGs, one image per request, each in its server's own form: {forms}), "
             f"{r['rounds']} rounds of {r['seconds']:g} s, every "
             "server once per round in a rotated order, after an untimed warm-up. Median over the rounds, "
             "range in brackets. "
             "The generator runs on the same 2 cores as the servers; its CPU is shown.", "",
             "| server | images/s | p50 (ms) | p99 (ms) | errors | generator CPU (cores) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in r["summary"].items():
        if "p50_ms" not in s:  # the in-process ceiling: no server, no requests
            batch = f", batches of {r['ceiling_batch']}" if "ceiling_batch" in r else ""
            lines.append(f"| {name} (DALI + ONNX Runtime in this process{batch}) | {_fmt(s['images_per_s'])} "
                         "| | | | |")
            continue
        lines.append(f"| {name} | {_fmt(s['images_per_s'])} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | "
                     f"{s['errors']} | {_fmt(s['generator_cores'])} |")
    lines += ["", "Throughput ratios, taken within each round:", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in r["throughput_ratios"].items()]
    lines += ["", "Targets (issue 12), at this concurrency:", ""] + [f"- {v}" for v in verdicts(r)]
    lines += ["", f"![compare]({image})", ""] if image else [""]
    return "\n".join(lines)
