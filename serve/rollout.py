"""Shadow rollout: a candidate served beside the current model on live traffic, then promoted or withdrawn.

    python -m serve.rollout --onnx artifacts/model.onnx --repo model_repository --data data/synthetic
    make publish SHADOW=1 ONNX=artifacts/model.onnx                  # the same, with the Makefile's settings

1. The candidate is checked as `make publish` checks it (it loads, it fits the served model, its val
   top-1 is within ``--max-top1-drop`` of the served one's, when ``--data`` is given).
2. It is loaded beside the served model as ``<model>_shadow`` (the fused layout's code and settings, the
   candidate's ONNX, payload sampling off). No client request is ever sent to it.
3. The served model is reloaded with the mirror on (its repository files unchanged; Triton loads the new
   instances beside the old ones and swaps, so it keeps answering): a share (``--percent``, all by default)
   of the batches it answers are sent to the candidate by a thread of its own, after the clients have
   their answers, and the top-1 answers compared (served/shadow.py).
4. Once ``--min-requests`` images are compared: the candidate is promoted (published as the served model's
   next version, as `make publish` does) when its top-1 agreement with the served model is at least
   ``--min-agreement`` % and its p99 compute time per batch (Triton's own latency summaries, for the
   same batches) is at most ``1 + --p99-margin`` times the served model's; otherwise it is withdrawn,
   with the figures. Either way the mirror is turned off (promoted: the new version loads the repository's
   configuration; withdrawn: the served model is reloaded with the mirror's parameter emptied) and the
   candidate unloaded, on every exit path (Ctrl-C included).

The report (``--out``, JSON and Markdown) states the agreement, the disagreements by class pair, both
p99s and the decision. The mirror writes its counts beside the server (the same machine, as `make publish`
writes into the repository). The fused layout on the embedded target only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build.model_config import config_text
from build.settings import read_manifest
from clients import admin
from clients.client import error_message
from clients.keys import ADMIN, UnusableKeyError
from core.atomic_io import atomic_write_bytes
from serve.publish import MODEL_FILE, PublishError, onnx_model_dir, precheck, publish, served_onnx
from served.shadow import read_summaries
from training.evaluate import DEFAULT_MAX_TOP1_DROP

SUFFIX = "_shadow"
DEFAULT_MIN_REQUESTS = 500
DEFAULT_MIN_AGREEMENT = 99.0
DEFAULT_P99_MARGIN = 0.25
REPORT = Path(__file__).resolve().parent.parent / "perf" / "reports" / "shadow"
P99_SERIES = "nv_inference_compute_infer_summary_us"  # per model, quantile="0.99": execute() per batch


def shadow_config(config_path: Path, name: str) -> str:
    """The served model's config as the candidate's: its own name, and no payload sampling of mirrored traffic."""
    cfg = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    cfg.name = name
    if "payload_percent" in cfg.parameters:
        cfg.parameters["payload_percent"].string_value = "0"
    return config_text(cfg)


def stage_candidate(onnx_path: Path, repo: Path, name: str) -> Path:
    """``<repo>/<name>/1``: the served version folder with the candidate's ONNX, written under a hidden name and
    renamed in one step; returns the model folder."""
    model_dir = onnx_model_dir(repo)
    target = Path(repo) / name
    shutil.rmtree(target, ignore_errors=True)  # left by a run that was killed outright
    staging = Path(repo) / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(served_onnx(repo).parent, staging / "1", ignore=shutil.ignore_patterns(MODEL_FILE, "__pycache__"))
    shutil.copyfile(onnx_path, staging / "1" / MODEL_FILE)
    (staging / "config.pbtxt").write_text(shadow_config(model_dir / "config.pbtxt", name))
    staging.rename(target)
    return target


def p99_us(metrics_url: str, model: str, timeout_s: float = 10.0) -> float | None:
    """Triton's p99 of ``model``'s compute time per request (its latency summary), None if it has none yet."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as r:
        text = r.read().decode()
    prefix = f'{P99_SERIES}{{model="{model}",'
    for line in text.splitlines():
        if line.startswith(prefix) and 'quantile="0.99"' in line:
            value = float(line.rsplit(" ", 1)[1])
            return None if value != value else value  # NaN: no observation in the window
    return None


def decide(counts: dict, p99_served: float | None, p99_candidate: float | None, min_requests: int,
           min_agreement: float, p99_margin: float) -> tuple[bool, str]:
    """(promote?, why), from the mirror's counts and both p99s."""
    compared = counts["mirrored"]
    if counts["errors"]:
        return False, f"the candidate failed {counts['errors']} mirrored image(s): {counts['errors_seen'][:1]}"
    if compared < min_requests:
        return False, f"only {compared} of the {min_requests} images needed were compared before the timeout"
    agreement = 100.0 * counts["agreed"] / compared
    if agreement < min_agreement:
        return False, f"top-1 agreement {agreement:.2f}% is below {min_agreement}%"
    if p99_served is None or p99_candidate is None:
        return False, "Triton reported no p99 for one of the two models"
    if p99_candidate > (1 + p99_margin) * p99_served:
        return False, (f"p99 {p99_candidate / 1e3:.2f} ms is more than {100 * p99_margin:.0f}% above the served "
                       f"model's {p99_served / 1e3:.2f} ms")
    return True, (f"top-1 agreement {agreement:.2f}% (at least {min_agreement}%) over {compared} images, p99 "
                  f"{p99_candidate / 1e3:.2f} ms against {p99_served / 1e3:.2f} ms (margin {100 * p99_margin:.0f}%)")


def shadow(onnx_path: Path, repo: Path, url: str, metrics_url: str, data: Path | None = None,
           protocol: str = "http", key: str | None = None, max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
           min_requests: int = DEFAULT_MIN_REQUESTS, min_agreement: float = DEFAULT_MIN_AGREEMENT,
           p99_margin: float = DEFAULT_P99_MARGIN, percent: float = 100.0, timeout_s: float = 600.0,
           poll_s: float = 1.0) -> dict:
    """Shadow ``onnx_path`` beside the served model of ``repo`` (served at ``url``), then promote or withdraw it;
    returns the report."""
    repo = Path(repo)
    manifest = read_manifest(repo)
    if manifest.get("target") != "embedded" or manifest.get("layout") != "fused":
        raise PublishError(f"{repo} is a {manifest.get('target')} repository in the {manifest.get('layout')} layout: "
                           "shadow rollout mirrors from the fused layout's model (embedded target; `make repo`)")
    figures = precheck(Path(onnx_path), repo, data, max_top1_drop)
    served = onnx_model_dir(repo).name
    name = served + SUFFIX
    records = Path(tempfile.mkdtemp(prefix="shadow-"))
    started = time.time()
    candidate_dir: Path | None = None
    promoted, why, counts = False, "", read_summaries(records)
    p99s: dict[str, float | None] = {}
    with admin.AdminClient(url, protocol, key, timeout_s=300) as c:
        try:
            candidate_dir = stage_candidate(Path(onnx_path), repo, name)
            try:
                c.load(name)
            except Exception as e:
                raise PublishError(f"the server did not load the candidate: {error_message(e)}") from None
            c.reload(served, {"shadow_model": name, "shadow_dir": str(records), "shadow_percent": str(percent)})
            print(f"shadowing {onnx_path} as '{name}' beside '{served}' ({percent:g}% of answered batches mirrored); "
                  f"promoting after {min_requests} images agree at least {min_agreement}%", file=sys.stderr)
            deadline, last = time.monotonic() + timeout_s, 0
            while time.monotonic() < deadline:
                counts = read_summaries(records)
                done = counts["mirrored"] + counts["errors"]
                if done >= min_requests or counts["errors"]:
                    break
                if done - last >= max(1, min_requests // 5):
                    print(f"  {done} of {min_requests} images compared", file=sys.stderr)
                    last = done
                time.sleep(poll_s)
            p99s = {served: p99_us(metrics_url, served), name: p99_us(metrics_url, name)}
            promoted, why = decide(counts, p99s[served], p99s[name], min_requests, min_agreement, p99_margin)
            if promoted:  # as `make publish` does; its load reads the repository's config: the mirror is off
                entry = publish(Path(onnx_path), repo, None, url, protocol, key, check=False)
                figures["version"] = entry["version"]
        finally:
            try:
                if not promoted:  # the mirror off (a plain load would change nothing: Triton skips a load of
                    # unchanged files, so the configuration with the mirror would stay)
                    c.reload(served, {"shadow_model": ""})
            finally:
                try:
                    c.unload(name)
                except Exception as e:  # never loaded, or the server is gone: nothing to unload
                    print(f"note: unloading '{name}': {error_message(e)}", file=sys.stderr)
                if candidate_dir is not None:
                    shutil.rmtree(candidate_dir, ignore_errors=True)
                shutil.rmtree(records, ignore_errors=True)  # the report holds the counts the decision was made on
    compared = counts["mirrored"]
    latency = sorted(counts.pop("latency_ms"))
    return {"onnx": str(onnx_path), "repo": str(repo), "model": served, "candidate": name, "percent": percent,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1), "decision": "promoted" if promoted else "withdrawn",
            "why": why, **figures, **counts,
            "agreement_percent": round(100.0 * counts["agreed"] / compared, 3) if compared else None,
            "p99_compute_ms": {k: (v / 1e3 if v is not None else None) for k, v in p99s.items()},
            "candidate_bls_p99_ms": latency[int(0.99 * (len(latency) - 1))] if latency else None,
            "thresholds": {"min_requests": min_requests, "min_agreement": min_agreement, "p99_margin": p99_margin}}


def markdown(r: dict) -> str:
    lines = [f"# Shadow rollout: {r['decision']}", "",
             f"{r['onnx']} shadowed beside '{r['model']}' ({r['repo']}) for {r['seconds']} s from {r['started']}, "
             f"{r['percent']:g}% of answered batches mirrored. {r['why']}.", "",
             "| images compared | agreed | agreement % | candidate errors | batches dropped | p99 compute ms (served) "
             "| p99 compute ms (candidate) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    p99 = r["p99_compute_ms"]

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    agreement = "–" if r["agreement_percent"] is None else f"{r['agreement_percent']:.2f}"
    lines.append(f"| {r['mirrored']} | {r['agreed']} | {agreement} | {r['errors']} | {r['dropped_batches']} | "
                 f"{ms(p99.get(r['model']))} | {ms(p99.get(r['candidate']))} |")
    if r["disagreements"]:
        lines += ["", "Disagreements by class pair (served → candidate):", "", "| served | candidate | images |",
                  "| --- | --- | ---: |"] + [f"| {a} | {b} | {n} |" for a, b, n in r["disagreements"]]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Shadow a candidate model on live traffic, then promote or withdraw it")
    p.add_argument("--onnx", type=Path, required=True, help="the candidate (exported by build.export_onnx)")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--data", type=Path, help="ImageFolder root whose val split gates accuracy first (omit: no gate)")
    p.add_argument("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP)
    p.add_argument("--url", default="127.0.0.1:8000", help="the running server (HTTP)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    p.add_argument("--min-requests", type=int, default=DEFAULT_MIN_REQUESTS, help="images compared before deciding")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, help="top-1 agreement, percent")
    p.add_argument("--p99-margin", type=float, default=DEFAULT_P99_MARGIN,
                   help="how much slower the candidate's p99 may be (0.25: 25%%)")
    p.add_argument("--percent", type=float, default=100.0, help="share of answered batches mirrored")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds of live traffic to wait for")
    p.add_argument("--out", type=Path, default=REPORT)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        r = shadow(args.onnx, args.repo, args.url, args.metrics_url, args.data, key=ADMIN.load(),
                   max_top1_drop=args.max_top1_drop, min_requests=args.min_requests, min_agreement=args.min_agreement,
                   p99_margin=args.p99_margin, percent=args.percent, timeout_s=args.timeout)
    except (PublishError, UnusableKeyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "report.json", lambda tmp: tmp.write_text(json.dumps(r, indent=2)))
    atomic_write_bytes(args.out / "report.md", lambda tmp: tmp.write_text(markdown(r)))
    print(markdown(r))
    return 0 if r["decision"] == "promoted" else 3


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
