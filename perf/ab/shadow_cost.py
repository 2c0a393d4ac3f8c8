"""What shadowing costs the clients: throughput and latency with the mirror off and on, side by side.

    python -m perf.ab shadow-cost --repo model_repository --images data/synthetic/val     # make shadow-cost

One server (explicit model control) serves the repository's fused model and, beside it, the same model as
the candidate (serve.rollout's ``<model>_shadow``). Each round wrk measures the clients with the mirror off,
then on (the served model reloaded with or without it, as serve.rollout does), in an order rotated from
round to round; median [range] over the rounds, and the per-round ratios. On a machine whose cores the
served model already fills, mirroring every batch doubles the model work: that is what --percent is for.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from clients import admin
from core import protocol as P
from perf.ab.variants import command
from perf.load.bodies import sample_images
from perf.load.stats import spread
from perf.load.wrk import Target, check_bodies, run_wrk, write_bodies
from perf.paths import REPORTS
from serve.publish import served_onnx
from serve.rollout import SUFFIX, stage_candidate
from serve.server import TritonServer


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10, connections: int = 16,
            percent: float = 100.0) -> dict:
    images = [b for _, b in sample_images(image_dir, 64)]
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"mirror off": [], f"mirror on ({percent:g}%)": []}
    with tempfile.TemporaryDirectory(prefix="shadow-cost-") as tmp:
        live, records, bodies = Path(tmp) / "repo", Path(tmp) / "records", Path(tmp) / "bodies"
        shutil.copytree(repo, live, ignore=shutil.ignore_patterns("__pycache__"))
        name = P.ENSEMBLE + SUFFIX
        stage_candidate(served_onnx(live), live, name)  # the same model: all work, no disagreement
        count = write_bodies(images, "kserve", bodies)
        with TritonServer(live, None, model_control="explicit", log_file=out / "tritonserver.log") as s, \
                admin.AdminClient(s.http_url, "http", None, timeout_s=300) as c:
            target = Target("triton", f"http://{s.http_url}", f"/v2/models/{P.ENSEMBLE}/infer", "kserve")
            check_bodies(target, bodies, count)
            settings = {"mirror off": {"shadow_model": ""},
                        f"mirror on ({percent:g}%)": {"shadow_model": name, "shadow_dir": str(records),
                                                      "shadow_percent": str(percent)}}
            names = list(settings)
            for r in range(rounds):
                for label in names[r % 2:] + names[:r % 2]:
                    c.reload(P.ENSEMBLE, settings[label])
                    run_wrk(target, bodies, count, 2, connections, 2)  # untimed: the new instances warm up
                    runs[label].append(run_wrk(target, bodies, count, seconds, connections, 2))
    off, on = names
    return {"when": time.strftime("%Y-%m-%d %H:%M"), "repo": str(repo), "rounds": rounds, "seconds": seconds,
            "connections": connections, "percent": percent, "images": len(images),
            "summary": {k: {"images_per_s": spread([x["per_s"] for x in v]),
                            "p50_ms": spread([x["p50_us"] / 1e3 for x in v]),
                            "p99_ms": spread([x["p99_us"] / 1e3 for x in v]),
                            "errors": sum(x["errors"] for x in v)} for k, v in runs.items()},
            "throughput_ratio_on_off": spread([b["per_s"] / a["per_s"] for a, b in zip(runs[off], runs[on],
                                                                                         strict=True)]),
            "p99_ratio_on_off": spread([b["p99_us"] / a["p99_us"] for a, b in zip(runs[off], runs[on], strict=True)])}


def markdown(r: dict) -> str:
    def f(x: dict, d: int = 1) -> str:
        return f"{x['median']:.{d}f} [{x['min']:.{d}f}–{x['max']:.{d}f}]"

    lines = ["# What shadowing costs the clients", "",
             f"Measured {r['when']} on {r['repo']} with wrk ({r['connections']} connections, the same {r['images']} "
             f"JPEGs), {r['rounds']} rounds of {r['seconds']} s, mirror off and on in a rotated order.", "",
             "| mirror | images/s | p50 ms | p99 ms | errors |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {k} | {f(s['images_per_s'], 0)} | {f(s['p50_ms'])} | {f(s['p99_ms'])} | {s['errors']} |"
              for k, s in r["summary"].items()]
    lines += ["", f"Per round, on/off: throughput {f(r['throughput_ratio_on_off'], 2)}, "
                  f"p99 {f(r['p99_ratio_on_off'], 2)}.", ""]
    return "\n".join(lines)


get_args_parser, main = command(__doc__.splitlines()[0], REPORTS / "shadow_cost", measure, markdown,
                                 {"--percent": {"type": float, "default": 100.0,
                                                "help": "share of answered batches mirrored"}})
