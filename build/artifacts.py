"""The artifact files of a build (``make onnx``, ``make quantize``), the ways the CPU target can serve them
(engine x precision), and which one a target serves."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.metadata import file_sha256
from served import engines
from served.engines import FILE_PRECISIONS, Engine, InferencePrecision, Precision, Target

ARTIFACT_NAMES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx",
                  "int8_ort": "model_int8_ort.onnx"}
# each artifact file's own precision (FILE_PRECISIONS, served/engines.py: the GPU target's choices)
ARTIFACT_PRECISIONS = {"fp32": Precision.FP32, "fp16": Precision.FP16, "int8": Precision.INT8,
                       "int8_ort": Precision.INT8}
REPORT = "build_report.json"  # build.quantize's report: every candidate's scores and the embedded INT8 choice
# make repo's own measurement where make quantize has not run (build.engine_choice): the FP32 file's candidates
ENGINE_REPORT = "engine_report.json"
# An engine other than ONNX Runtime (the default) is chosen for a precision only when make quantize measured
# it this much faster: equal engines (both run f32 kernels) would otherwise swap on the timing noise.
ENGINE_MARGIN = 1.05


@dataclass(frozen=True)
class Candidate:
    """One way the CPU target can serve the model: an artifact file on an engine at a precision."""

    engine: str                       # an embedded-target engine of served/engines.py
    artifact: str                     # a key of ARTIFACT_NAMES
    precision: str                    # the PRECISION it serves
    inference_precision: str = InferencePrecision.F32  # the engine's precision hint (OpenVINO: f32 or bf16)


def engine_candidates(engine: Engine) -> dict[str, Candidate]:
    """The ways ``engine`` serves the artifacts, by name: each file of a precision it takes, computed as the
    file says (named by the artifact), and the FP32 file at each of its lower precision hints (named by the
    hint). The default engine's names are the artifacts' own (the report's rows from before OpenVINO), the
    others' are prefixed with the engine's name."""
    prefix = "" if engine.default else f"{engine.name}_"
    out: dict[str, Candidate] = {}
    for artifact, precision in ARTIFACT_PRECISIONS.items():
        if precision not in engine.file_precisions:
            continue
        for hint in engine.inference_precisions:
            if hint == InferencePrecision.F32:
                out[f"{prefix}{artifact}"] = Candidate(engine.name, artifact, precision)
            elif precision == Precision.FP32:
                out[f"{prefix}{hint}"] = Candidate(engine.name, artifact, Precision(hint), hint)
    return out


@lru_cache(maxsize=8)
def _candidates(registered: tuple[Engine, ...]) -> dict[str, Candidate]:
    return {name: c for engine in registered for name, c in engine_candidates(engine).items()}


class Candidates(Mapping[str, Candidate]):
    """Every candidate make quantize scores, gates and times: those of each engine of the embedded target, in
    the registry's order (served/engines.py), read from it at each look-up, so that a registered engine is one."""

    def _table(self) -> dict[str, Candidate]:
        return _candidates(engines.engines(Target.EMBEDDED))

    def __getitem__(self, name: str) -> Candidate:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


CANDIDATES: Mapping[str, Candidate] = Candidates()
# what the CPU target serves; PRECISION=auto: the fastest passing
PRECISIONS = tuple(p for p in Precision if any(c.precision == p for c in CANDIDATES.values()))


def artifact_for(precision: str, artifacts: Path, target: str = Target.EMBEDDED) -> Path:
    """The ONNX file a target serves for a precision on ONNX Runtime. Embedded INT8: the build report's CPU
    choice; the GPU target builds its engine from the ModelOpt Q/DQ file (its path is returned whether or not
    it exists yet)."""
    if precision not in FILE_PRECISIONS:
        raise ValueError(f"PRECISION must be one of {', '.join(FILE_PRECISIONS)} here, got {precision!r}")
    if target != Target.EMBEDDED:
        return Path(artifacts) / ARTIFACT_NAMES[precision]
    if precision in (Precision.FP32, Precision.FP16):
        path = Path(artifacts) / ARTIFACT_NAMES[precision]
    else:
        report_path = Path(artifacts) / REPORT
        if not report_path.is_file():
            raise FileNotFoundError(f"{report_path} not found: run `make quantize` first")
        choice = json.loads(report_path.read_text())["embedded_int8"]
        if choice is None:
            raise ValueError("no INT8 artifact passed the accuracy gate (see build_report.md)")
        path = Path(artifacts) / ARTIFACT_NAMES[choice]
    if not path.is_file():
        make = "onnx" if precision == Precision.FP32 else "quantize"
        raise FileNotFoundError(f"{path} not found: run `make {make}` first")
    return path


def fp32_sha256(path: Path) -> str:
    """The file's sha256, hashed once per version of the file: one `make repo` asks for the current report
    several times (the engine choice, the batch and the instances fits), and a 224-px model is 100 MB."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(Path(path))


def current_report(artifacts: Path, names: tuple[str, ...] = (REPORT, ENGINE_REPORT)) -> dict[str, Any] | None:
    """The build report, if it was measured on the FP32 model that is in ``artifacts`` now; else make repo's
    engine report (build.engine_choice), if that was."""
    fp32 = Path(artifacts) / ARTIFACT_NAMES["fp32"]
    for path in (Path(artifacts) / name for name in names):
        if not path.is_file():
            continue
        report: dict[str, Any] = json.loads(path.read_text())
        measured = report.get("fp32_sha256")
        if measured and fp32.is_file() and fp32_sha256(fp32) != measured:
            print(f"note: {path} was measured on another {fp32.name} (exported since): its engine timings are not "
                  "used")
            continue
        report["path"] = str(path)
        return report
    return None


def _images_per_s(report: dict[str, Any], name: str) -> float:
    return float(report["artifacts"][name]["latency"]["best_images_per_s"])


def fastest(report: dict[str, Any], names: list[str]) -> str:
    """The fastest of ``names`` in the report; ONNX Runtime unless another engine beats it by ENGINE_MARGIN."""
    best = max(names, key=lambda n: _images_per_s(report, n))
    default = engines.default_for(Target.EMBEDDED).name
    on_ort = [n for n in names if CANDIDATES[n].engine == default]
    if on_ort and CANDIDATES[best].engine != default:
        ort_best = max(on_ort, key=lambda n: _images_per_s(report, n))
        if _images_per_s(report, best) < ENGINE_MARGIN * _images_per_s(report, ort_best):
            return ort_best
    return best


def served_for(precision: str, artifacts: Path, engine: str | None = None) -> tuple[Path, Candidate]:
    """What the CPU target serves for ``precision`` (or ``auto``) on ``engine`` (None: the fastest measured):
    the candidates make quantize scored that pass its accuracy gate. Without a report for this model, FP32 and
    FP16 are served as exported (ONNX Runtime, or OpenVINO at f32); bf16, INT8 and auto need the report."""
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"PRECISION must be one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
    if engine is not None and engine not in engines.names(Target.EMBEDDED):
        raise ValueError(f"ENGINE must be one of {', '.join(engines.names(Target.EMBEDDED))}, got {engine!r}")
    report = current_report(artifacts)
    matching = [n for n, c in CANDIDATES.items() if precision in ("auto", c.precision) and engine in (None, c.engine)]
    if not matching:
        serves = sorted({c.precision for c in CANDIDATES.values() if c.engine == engine})
        raise ValueError(f"{engine} does not serve {precision} on the CPU (it serves {', '.join(serves)})")
    if report is None:
        exact = [n for n in matching if precision in (Precision.FP32, Precision.FP16, "auto")
                 and CANDIDATES[n].precision in (Precision.FP32, Precision.FP16)
                 and CANDIDATES[n].inference_precision == InferencePrecision.F32]
        if not exact:
            raise FileNotFoundError(f"{Path(artifacts) / REPORT} for this model not found: run `make quantize` first "
                                    f"(it scores, gates and times every engine x precision; {precision} needs it)")
        name = exact[0]  # ONNX Runtime first: FP32 as exported
    else:
        passing = [n for n in matching if n in report["artifacts"] and n not in report["gate_failures"]]
        if not passing:
            raise ValueError(f"no candidate for PRECISION={precision}{f' ENGINE={engine}' if engine else ''} was "
                             f"measured and passed the accuracy gate (see {Path(artifacts) / 'build_report.md'})")
        name = fastest(report, passing)
    path = Path(artifacts) / ARTIFACT_NAMES[CANDIDATES[name].artifact]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make {'onnx' if name == 'fp32' else 'quantize'}` first")
    return path, CANDIDATES[name]


# The batcher's preferred batch follows the served candidate's measured cost (max_batch_size, the largest
# request a client may send, does not: build/render_repo.py fit_to_cost): the smallest batch make quantize
# measured within BATCH_THROUGHPUT_SHARE of that candidate's best throughput. A bigger batch gains nothing
# and only lengthens each one: with 16 requests in flight and no preferred size, an idle instance takes all
# 16 at once, and a 224-px ResNet-50 on one core answers them after ~300 ms
# (p99 332 ms measured), where a cheap 64-px model keeps 32.
BATCH_THROUGHPUT_SHARE = 0.95


def candidate_name(candidate: Candidate) -> str | None:
    """The CANDIDATES key of ``candidate`` (build reports are keyed by it)."""
    return next((n for n, c in CANDIDATES.items() if c == candidate), None)


def measured_throughput(artifacts: Path, candidate: Candidate) -> tuple[str | None, dict, dict[int, float]]:
    """(its CANDIDATES name, the current build report or {}, images/s by batch size) of ``candidate``: what
    make quantize timed, on every core of the building machine ({} by batch when it was not timed)."""
    report = current_report(artifacts) or {}
    name = candidate_name(candidate)
    row = report.get("artifacts", {}).get(name or "", {})
    return name, report, {int(b): m["images_per_s"] for b, m in row.get("latency", {}).get("by_batch", {}).items()}


def fitted_batch(artifacts: Path, candidate: Candidate) -> tuple[int, str] | None:
    """(the batch size, why) from the current build report's latencies of ``candidate``, or None without them."""
    name, report, by_batch = measured_throughput(artifacts, candidate)
    if not by_batch:
        return None
    best = max(by_batch.values())
    batch = min(b for b, r in by_batch.items() if r >= BATCH_THROUGHPUT_SHARE * best)
    return batch, (f"{name}'s measured cost: {by_batch[batch]:.0f} img/s at batch {batch}, best "
                   f"{best:.0f} ({report.get('path', Path(artifacts) / REPORT)})")


# The classifier's instances follow the cost too (the embedded target: one single-threaded instance per core,
# or one more). Measured side by side (perf/ab/instances.py, wrk at 16 connections, 2 cores): for MobileNetV3-Large
# (about 3.5 ms of one core per image) and ResNet-50 (about 7.5 ms) at 224 px, one instance per core served as
# much as three, or more, at a 11-14% lower p99: a third instance only time-slices the cores and lengthens
# every batch. For the 64-px demo model (about 0.3 ms) one per core let Triton 2.51's batcher stall
# (docs/performance.md, "Throughput": a missed release of a busy instance, then a 500 ms sleep) in 3 of 6
# rounds, one more in none. Below LIGHT_MS_PER_IMAGE a model gets that one more. One thread each: one instance
# with every core lost half the throughput, its cores idle while it decodes.
LIGHT_MS_PER_IMAGE = 1.0


def fitted_instances(artifacts: Path, candidate: Candidate, cores: int) -> tuple[int, str] | None:
    """(classifier instances, why) for ``cores`` serving cores from the current build report's best throughput
    of ``candidate`` (measured on every core of the building machine), or None without it."""
    name, report, by_batch = measured_throughput(artifacts, candidate)
    if not by_batch:
        return None
    best = max(by_batch.values())
    measured_cores = int(report.get("cpu", {}).get("cores") or cores)
    ms = 1000 * measured_cores / best  # of one core, per image
    light = ms < LIGHT_MS_PER_IMAGE
    instances = cores + 1 if light else cores
    return instances, (f"{name}'s measured cost: {ms:.2f} ms of one core per image, "
                       f"{'under' if light else 'over'} {LIGHT_MS_PER_IMAGE} ms: "
                       f"{'one more instance than' if light else 'one instance per'} core ({cores}; "
                       f"{report.get('path', Path(artifacts) / REPORT)})")


def rendered_candidate(manifest: dict[str, Any], onnx_path: Path) -> Candidate | None:
    """The candidate an embedded repository serves, from its manifest (build.json) and its ONNX file."""
    return next((c for c in CANDIDATES.values() if c.engine == manifest.get("engine")
                 and ARTIFACT_NAMES[c.artifact] == Path(onnx_path).name
                 and c.inference_precision == manifest.get("inference_precision")), None)
