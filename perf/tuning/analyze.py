"""Triton Model Analyzer on the served repository: its search, its winner written back.

    python -m perf.tuning.analyze --repo model_repository --images data/synthetic/val   # make analyze

Model Analyzer 1.58 (PyPI `triton-model-analyzer`, in its own virtualenv `.venv-analyzer`: `make
analyzer`) launches the wheel's tritonserver itself (local launch mode) with the backend directory and
environment this project's server uses (serve/server.py), and drives our perf_analyzer (its own
tritonclient has none) with the JPEGs as `--input-data` (random bytes do not decode). Its quick search
varies the model's max batch size, instance count and the client concurrency. The configuration with
the highest throughput whose p99 is within the budget is written back to the repository (instances and
max batch size, through build.render_repo, so the repository stays one render). The project's tuner
(`make tune`) keeps what Model Analyzer does not search: the batching delay and preferred sizes.

The fused layout's one model is profiled directly; an ensemble layout is profiled through its ensemble,
its composing models on the CPU (`cpu_only_composing_models`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build import layouts
from build.render_repo import render
from build.settings import read_manifest, rendered_onnx, settings_from_manifest
from core import protocol as P
from perf.load.bodies import sample_images
from perf.load.perf_analyzer import perf_analyzer_binary, perf_analyzer_env, write_input_data
from perf.paths import PROJECT_ROOT, REPORTS
from perf.tuning import tune
from serve.server import TritonServer

VENV = PROJECT_ROOT / ".venv-analyzer"


def model_analyzer() -> Path:
    exe = VENV / "bin" / "model-analyzer"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} missing: run `make analyzer` (Triton Model Analyzer in its own virtualenv)")
    return exe


def write_config(repo: Path, work: Path, input_json: Path, instances: tuple[int, int], batch: tuple[int, int],
                 concurrency: tuple[int, int]) -> Path:
    """The YAML (JSON is YAML) Model Analyzer reads; each pair is the (min, max) its search may try."""
    layout = layouts.of_manifest(read_manifest(repo))
    server = TritonServer(repo, None)
    command, env = server.command(), server.environment()
    backend_dir = next(a.split("=", 1)[1] for a in command if a.startswith("--backend-directory="))
    libs = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), perf_analyzer_env().get("LD_LIBRARY_PATH")]))
    config = {
        "model_repository": str(Path(repo).resolve()),
        "output_model_repository_path": str(work / "output_repository"),
        "override_output_model_repository": True,
        "export_path": str(work / "export"),
        "checkpoint_directory": str(work / "checkpoints"),
        "triton_launch_mode": "local",
        "triton_server_path": command[0],
        "triton_server_flags": {"backend_directory": backend_dir},
        # Model Analyzer hands this environment to perf_analyzer too, which needs libcudart
        "triton_server_environment": {"PATH": env["PATH"], "PYTHONPATH": env.get("PYTHONPATH", ""),
                                      "LD_LIBRARY_PATH": libs},
        "perf_analyzer_path": str(perf_analyzer_binary()),
        # a shared 2-core machine rarely holds throughput within perf_analyzer's default 10%: without a
        # looser bound Model Analyzer keeps raising the request count and never finishes a point
        "perf_analyzer_flags": {"input-data": str(input_json), "stability-percentage": 50, "max-trials": 5},
        "run_config_search_mode": "quick",
        "run_config_search_min_instance_count": instances[0], "run_config_search_max_instance_count": instances[1],
        "run_config_search_min_model_batch_size": batch[0], "run_config_search_max_model_batch_size": batch[1],
        "run_config_search_min_concurrency": concurrency[0], "run_config_search_max_concurrency": concurrency[1],
        "collect_cpu_metrics": True,
        "skip_detailed_reports": True,
        "profile_models": {P.ENSEMBLE: {"cpu_only": True}},
    }
    if not layout.single_model:
        config["cpu_only_composing_models"] = list(layout.python_models())
    path = work / "model_analyzer.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def run_profile(config: Path, log: Path, timeout_s: float) -> None:
    """`model-analyzer profile`; everything it starts (tritonserver, perf_analyzer) goes when it ends."""
    env = perf_analyzer_env()
    env["PATH"] = os.pathsep.join([str(VENV / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    with open(log, "w") as out:
        proc = subprocess.Popen([str(model_analyzer()), "profile", "-f", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the servers it started are in it
        proc.wait()
    if code != 0:
        raise RuntimeError(f"model-analyzer profile {'timed out' if code is None else f'failed ({code})'}: "
                           f"{log.read_text()[-3000:]}")


def results(work: Path) -> list[dict]:
    """Every measurement Model Analyzer exported, with the searched settings of its configuration."""
    rows = []
    with open(work / "export" / "results" / "metrics-model-inference.csv") as f:
        for row in csv.DictReader(f):
            config_path = work / "output_repository" / row["Model Config Path"] / "config.pbtxt"
            cfg = text_format.Parse(config_path.read_text(), mc.ModelConfig())
            rows.append({"config": row["Model Config Path"], "concurrency": int(row["Concurrency"]),
                         "instances": sum(g.count for g in cfg.instance_group), "max_batch_size": cfg.max_batch_size,
                         "throughput": float(row["Throughput (infer/sec)"]), "p99_ms": float(row["p99 Latency (ms)"]),
                         "satisfies_constraints": row["Satisfies Constraints"] == "Yes"})
    if not rows:
        raise RuntimeError(f"Model Analyzer measured nothing (see {work / 'export' / 'perf_analyzer_error.log'})")
    return rows


def choose(rows: list[dict], p99_budget_ms: float, concurrency: tuple[int, int]) -> tuple[dict, bool]:
    """Best throughput within the budget, among the points measured at the concurrencies asked for (Model
    Analyzer also measures the repository's own configuration at a concurrency of its choosing); if none
    meets the budget, the lowest p99 (and False)."""
    asked = [r for r in rows if concurrency[0] <= r["concurrency"] <= concurrency[1]] or rows
    return tune.choose(asked, p99_budget_ms, eligible=lambda r: r["satisfies_constraints"])


def analyze(repo: Path, images: Path, out: Path, p99_budget_ms: float = 50.0, instances: tuple[int, int] = (1, 4),
            batch: tuple[int, int] = (8, 64), concurrency: tuple[int, int] = (16, 32), apply: bool = True,
            timeout_s: float = 3600.0) -> dict:
    manifest = read_manifest(repo)
    layout = layouts.of_manifest(manifest)
    if manifest.get("target", "embedded") != "embedded" or not layout.single_model:
        raise ValueError(f"{repo} is a {manifest.get('target')} repository in the {layout.name} layout; "
                         "make analyze searches the embedded fused model (its instances and max batch size): render "
                         f"it with `make repo` (or LAYOUT={layouts.DEFAULT_LAYOUT['embedded']}), or tune an ensemble "
                         "with `make tune`")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="model-analyzer-") as tmp:
        work = Path(tmp)
        input_json = write_input_data([b for _, b in sample_images(images)], work / "input.json")
        config = write_config(repo, work, input_json, instances, batch, concurrency)
        run_profile(config, out / "model_analyzer.log", timeout_s)
        rows = results(work)
        for name in ("results/metrics-model-inference.csv", f"reports/summaries/{P.ENSEMBLE}/result_summary.html"):
            src = work / "export" / name
            if src.is_file():
                (out / src.name).write_bytes(src.read_bytes())
    best, met = choose(rows, p99_budget_ms, concurrency)
    summary = {"p99_budget_ms": p99_budget_ms, "budget_met": met, "best": best, "results": rows,
               "search": {"instances": instances, "max_batch_size": batch, "concurrency": concurrency}}
    (out / "analyze.json").write_text(json.dumps(summary, indent=2))
    print(f"Model Analyzer: {len(rows)} measurements; best within p99 {p99_budget_ms:g} ms: " if met else
          f"Model Analyzer: {len(rows)} measurements, none within p99 {p99_budget_ms:g} ms; lowest p99: ", end="")
    print(f"{best['instances']} instances, max batch {best['max_batch_size']} at concurrency {best['concurrency']}: "
          f"{best['throughput']:.0f} img/s, p99 {best['p99_ms']:.1f} ms")
    if apply:
        settings = replace(settings_from_manifest(manifest), classifier_instances=best["instances"],
                           max_batch_size=best["max_batch_size"])
        render(rendered_onnx(repo), repo, settings, layout=layout.name)
        print(f"wrote instances {best['instances']} and max batch size {best['max_batch_size']} back to {repo}")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Triton Model Analyzer's search on the served (fused) model, its winner "
                                            "written back to the repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, default=Path("data/synthetic/val"))
    p.add_argument("--out", type=Path, default=REPORTS / "analyze")
    p.add_argument("--p99-budget-ms", type=float, default=50.0)
    p.add_argument("--instances", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"))
    p.add_argument("--max-batch", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    p.add_argument("--concurrency", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"))
    p.add_argument("--no-apply", action="store_true", help="only report, do not write back")
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    try:
        analyze(a.repo, a.images, a.out, a.p99_budget_ms, tuple(a.instances), tuple(a.max_batch), tuple(a.concurrency),
                not a.no_apply)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from e
