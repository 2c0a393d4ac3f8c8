"""The batcher's preferred batch, fitted to the model's cost, against none (batches up to 32): side by side.

    python -m perf.ab batch-fit --repo .cache/workloads/resnet50-photos/repo --images .cache/workloads/data/photos/val

The repository's model and settings served twice under the same load generator (wrk, perf/load/wrk.py),
alternating rounds, both accepting requests of up to max_batch_size 32 images: without a preferred batch size
(the batcher forms the largest batch it can) and with the preferred size `make repo` fits to the served
candidate's cost from make quantize's latencies (build.artifacts fitted_batch). Throughput and p99 of
each, with their spread.
"""

from __future__ import annotations

from pathlib import Path

from build.artifacts import fitted_batch, rendered_candidate
from build.settings import RepoSettings, read_manifest, rendered_onnx
from perf.ab.variants import Variant, command, variants
from perf.paths import REPORTS

FIXED = RepoSettings().max_batch_size  # the built-in default, which every model got before


def measure(repo: Path, image_dir: Path, out: Path, rounds: int = 3, seconds: int = 10,
            connections: int = 16) -> dict:
    onnx = rendered_onnx(repo)
    served = rendered_candidate(read_manifest(repo), onnx)
    fit = fitted_batch(onnx.parent, served) if served is not None else None
    if fit is None:
        raise ValueError(f"{repo}: no make quantize latencies for its served model to fit the batch to")
    servers: tuple[Variant, ...] = (
        (f"max batch {FIXED}, no preferred size", {"max_batch_size": FIXED, "preferred_batch_sizes": ()}, {}),
        (f"max batch {FIXED}, preferred {fit[0]} (fitted)",
         {"max_batch_size": FIXED, "preferred_batch_sizes": (fit[0],)}, {}))
    r = variants(repo, image_dir, out, servers, rounds, seconds, connections)
    r["fitted"] = {"preferred_batch_size": fit[0], "why": fit[1]}
    return r


get_args_parser, main = command("The preferred batch fitted to the model's cost against none, side by side",
                                 REPORTS / "batch_fit", measure)
