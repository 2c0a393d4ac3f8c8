"""Precision artifacts, the accuracy gate, serving each precision, the GPU repository and the engine path.

GPU-only steps (TensorRT engines, the DALI GPU pipeline) are skipped here with the reason printed;
what can be checked without a GPU is: configs, wiring, plan stamps and the clean refusal."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import GATE_OPEN, MAX_BATCH
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from build import layouts, quantize
from build.artifacts import ARTIFACT_NAMES, CANDIDATES, REPORT, artifact_for, served_for
from build.engine import (
    EngineEnvironmentError,
    check_environment,
    check_plan,
    gpu_compute_capability,
    verify_repository,
)
from build.gate import gate_images
from build.graph_cleanup import clean
from build.model_config import check_ensemble, read_configs
from build.render_repo import render
from build.settings import BatchProfile, RepoSettings, read_manifest, repo_settings
from clients.client import ImageClassifierClient
from core import protocol as P
from core.metadata import read_metadata
from core.preprocess import DaliPreprocessor
from core.runners import isolated, logits_of, make_runner
from perf.ab import precisions
from serve.server import TritonServer
from served.engines import ort_session
from served.stages import TopK

ROOT = Path(__file__).resolve().parent.parent


def _gpu_and_tensorrt() -> str | None:
    try:
        check_environment()
        return None
    except EngineEnvironmentError as e:
        return str(e)


NO_GPU = _gpu_and_tensorrt()
NO_CUDA_GPU = None if gpu_compute_capability() else "no NVIDIA GPU here (nvidia-smi found none)"


@pytest.fixture(scope="module")
def artifacts(onnx_model, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    shutil.copy(onnx_model, out / "model.onnx")
    # the tiny val split has 80 images: one image is 1.25 points of top-1 and of agreement, so the default gate
    # would fail on a single flipped image; allow two (the gate itself is tested below)
    quantize.build(out / "model.onnx", tiny_data, out, calib_size=32, max_top1_drop=2.5, min_agreement=97.5)
    return out


def test_build_report_and_artifacts(artifacts):
    report = json.loads((artifacts / REPORT).read_text())
    # every artifact on ONNX Runtime, and on OpenVINO at f32, at bf16 and from both Q/DQ files
    assert set(report["artifacts"]) == set(CANDIDATES)
    assert not report["gate_failures"]
    for name, r in report["artifacts"].items():
        path = artifacts / r["file"]
        assert (r["engine"], r["precision"]) == (CANDIDATES[name].engine, CANDIDATES[name].precision)
        assert r["size_bytes"] == path.stat().st_size
        assert r["file"] == ARTIFACT_NAMES[CANDIDATES[name].artifact]
        assert 0 <= r["top1"] <= 100
        assert r["latency"]["best_images_per_s"] > 0
        assert r["latency"]["batch1_ms"] > 0
        assert read_metadata(path).export.precision == ("int8" if name.endswith(("int8", "int8_ort")) else
                                                              CANDIDATES[name].artifact)
    # OpenVINO's own default on a bf16 CPU is bf16: the f32 candidate must really compute in f32 (as ONNX
    # Runtime's FP32 does), and the bf16 one in bf16 where the CPU has the units
    arts = report["artifacts"]
    assert arts["openvino_fp32"]["max_abs_logit_diff"] < 1e-3
    if {"avx512_bf16", "amx_bf16"} & set(report["cpu"]["flags"]):
        assert arts["openvino_bf16"]["max_abs_logit_diff"] > 10 * arts["openvino_fp32"]["max_abs_logit_diff"]
    # what the report says make repo serves is what it serves, at the precision asked for
    assert set(report["serving"]) == {"fp32", "fp16", "bf16", "int8", "auto"}
    for precision, name in report["serving"].items():
        assert precision in ("auto", CANDIDATES[name].precision)
        assert served_for(precision, artifacts)[1] == CANDIDATES[name]
    assert report["fp32_sha256"] == hashlib.sha256((artifacts / "model.onnx").read_bytes()).hexdigest()
    fp16 = onnx.load(str(artifacts / "model_fp16.onnx"))
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # FP32 I/O kept
    assert any(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
    int8 = onnx.load(str(artifacts / "model_int8.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) >= 10  # explicit Q/DQ
    for name in ("int8", "int8_ort"):  # logits and probabilities leave the graph unquantized (uint8 logits tie classes)
        model = onnx.load(str(artifacts / ARTIFACT_NAMES[name]))
        producers = {o: n for n in model.graph.node for o in n.output}
        assert [o.name for o in model.graph.output] == ["logits", "probabilities"], name
        for out in model.graph.output:
            assert producers[out.name].op_type not in ("DequantizeLinear", "QuantizeLinear"), (name, out.name)
        softmax = producers["probabilities"]
        assert softmax.op_type == "Softmax", name
        assert producers[softmax.input[0]].op_type not in ("DequantizeLinear",), name
    calib = np.load(artifacts / "calib" / "calib.npy")
    sources = (artifacts / "calib" / "calib_sources.txt").read_text().splitlines()
    assert calib.shape[0] == len(sources) == 32
    assert calib.shape[1:] == (3, 32, 32)
    md = (artifacts / "build_report.md").read_text()
    assert "| fp16 | onnxruntime | fp16 |" in md
    assert "| openvino_bf16 | openvino | bf16 | model.onnx |" in md
    assert f"auto → **{report['serving']['auto']}**" in md
    assert "CPU features:" in md


def test_calibration_batch_is_reproducible_from_its_source_list(onnx_model, tiny_data, tmp_path):
    meta = read_metadata(onnx_model)
    train = gate_images(tiny_data, meta.classes).calibrate
    first = quantize.calibration_batch(meta, train, tiny_data, 12, tmp_path / "a")
    again = quantize.calibration_batch(meta, train, tiny_data, 12, tmp_path / "b")
    assert np.array_equal(first, again)
    assert np.array_equal(first, np.load(tmp_path / "a" / "calib" / "calib.npy"))
    lines = (tmp_path / "a" / "calib" / "calib_sources.txt").read_text().splitlines()
    files = [tiny_data / ln.split("  ", 1)[1] for ln in lines]
    assert len(set(f.parent for f in files)) == 10  # spread over every class, not the first few
    assert all(hashlib.sha256(f.read_bytes()).hexdigest() == ln.split("  ", 1)[0]
               for f, ln in zip(files, lines, strict=True))
    # the listed files, preprocessed as served, are exactly the saved batch
    assert np.array_equal(DaliPreprocessor(meta.preprocess).files(files), first)


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of every QuantizeLinear whose input is an activation (not an initializer)."""
    inits = {i.name: i for i in model.graph.initializer}
    weights = set(inits)
    return {n.input[0]: float(onnx.numpy_helper.to_array(inits[n.input[1]]).ravel()[0])
            for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in weights and n.input[1] in inits}


def test_calibration_method_entropy_clips_the_ranges(artifacts, tiny_data, tmp_path):
    shutil.copy(artifacts / "model.onnx", tmp_path / "model.onnx")
    # gate wide open: this test is about the ranges; what entropy costs in accuracy is in the report
    report = quantize.build(tmp_path / "model.onnx", tiny_data, tmp_path, calib_size=32, calib_method="entropy",
                            **GATE_OPEN, precisions=("int8_ort", "int8"))
    assert report["calibration"] == {"images": 32, "method": "entropy"}
    assert (json.loads((artifacts / REPORT).read_text())["calibration"]["method"]
            == quantize.DEFAULT_CALIB_METHOD)
    for name in ("int8_ort", "int8"):
        maxed = _activation_scales(onnx.load(str(artifacts / ARTIFACT_NAMES[name])))
        entropy = _activation_scales(onnx.load(str(tmp_path / ARTIFACT_NAMES[name])))
        shared = set(entropy) & set(maxed)
        assert shared, name
        # same 32 images: max calibration covers the full range, entropy clips outliers, so scales are >=
        assert all(maxed[t] >= entropy[t] * 0.999 for t in shared), name
        assert any(maxed[t] > entropy[t] * 1.01 for t in shared), name
    # the CPU INT8 uses uint8 activations (ONNX Runtime's fast x86 path; int8 activations ran slower than FP32)
    ort_int8 = onnx.load(str(artifacts / ARTIFACT_NAMES["int8_ort"]))
    inits = {i.name: i for i in ort_int8.graph.initializer}
    zero_points = [inits[n.input[2]] for n in ort_int8.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert zero_points
    assert all(z.data_type == TensorProto.UINT8 for z in zero_points)


def test_accuracy_gate_fails_the_build_and_writes_no_artifact(onnx_model, tiny_data, tmp_path, capsys):
    shutil.copy(onnx_model, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="calibration method must be one of max, entropy, got 'minmax'"):
        quantize.build(tmp_path / "model.onnx", tiny_data, tmp_path, calib_method="minmax")
    # a negative allowance demands beating FP32 by a point: every converted artifact must fail (INT8 after
    # its recovery tries), and an INT8 failure says what was tried and which knob is left; an artifact
    # left by an earlier, passing build is removed
    (tmp_path / "model_fp16.onnx").write_bytes(b"an earlier build's artifact")
    with pytest.raises(quantize.AccuracyGateError, match=r"fp16: top-1 .* vs FP32 .*int8_ort: top-1 .*"
                                                         r"more calibration images \(CALIB_SIZE, now 8\); "
                                                         r"int8_ort recovery tried \d+ ways \(other calibration"):
        quantize.build(tmp_path / "model.onnx", tiny_data, tmp_path, calib_size=8, max_top1_drop=-1.0,
                       precisions=("fp16", "int8_ort"))
    assert not (tmp_path / "model_fp16.onnx").exists()
    assert not (tmp_path / "model_int8_ort.onnx").exists()
    # every candidate is gated, OpenVINO's too (their files are the ONNX Runtime ones: removed above)
    assert json.loads((tmp_path / REPORT).read_text())["gate_failures"] == [
        "fp16", "int8_ort", "openvino_fp32", "openvino_bf16", "openvino_int8_ort"]
    assert "one image is 1.25 points of top-1" in capsys.readouterr().out  # 80 val images: the gate's resolution


def test_served_precisions_side_by_side(artifacts, repo, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="include fp32"):
        precisions.compare(artifacts, repo, tiny_data / "val", tmp_path, ("int8",))
    with pytest.raises(FileNotFoundError, match="run `make onnx` first"):  # before any server starts
        precisions.compare(tmp_path / "nothing", repo, tiny_data / "val", tmp_path, ("fp32", "int8"))
    r = precisions.compare(artifacts, repo, tiny_data / "val", tmp_path / "out", ("fp32", "int8"), rounds=1,
                           concurrency=2, interval_ms=500, request_count=60)
    rows = {x["precision"]: x for x in r["results"]}
    assert rows["fp32"]["onnx"] == str(artifacts / "model.onnx")
    assert rows["int8"]["onnx"] == str(artifact_for("int8", artifacts))
    # each precision is served with the batching settings of the repository it is compared for
    assert all(x["settings"] == r["settings"] and x["settings"]["max_batch_size"] == MAX_BATCH for x in rows.values())
    assert all(x["throughput"] > 0 and x["p99_ms"] >= x["p50_ms"] > 0 for x in rows.values())
    assert f"| 1 | int8 | {rows['int8']['throughput']:.0f} |" in (tmp_path / "out" / "precisions.md").read_text()


@pytest.mark.parametrize(("precision", "engine"), [("fp16", "onnxruntime"), ("int8", "onnxruntime"),
                                                  ("bf16", "openvino"), ("int8", "openvino")])
def test_embedded_repository_serves_each_precision(artifacts, tiny_data, val_files, tmp_path, precision, engine):
    onnx_path, served = served_for(precision, artifacts, engine)
    assert (served.engine, served.precision) == (engine, precision)
    repo = tmp_path / "repo"
    render(onnx_path, repo, RepoSettings(max_batch_size=MAX_BATCH, top_k=3), served=served)
    meta = read_metadata(onnx_path)
    options = {"inference_precision": served.inference_precision} if engine == "openvino" else {}
    inputs = DaliPreprocessor(meta.preprocess).files(val_files)
    # OpenVINO in a process of its own, as every measurement runs it (core.runners.isolated)
    logits = isolated(logits_of, engine, onnx_path.read_bytes(), inputs, threads=0, **options)
    with TritonServer(repo, None) as server, ImageClassifierClient(server.grpc_url, "grpc") as c:
        preds = c.classify_files(val_files, batch_size=MAX_BATCH)
    served_top1 = np.array([meta.classes.index(p.labels[0]) for p in preds])
    assert np.mean(served_top1 == logits.argmax(1)) >= 0.995  # the artifact's own answers on its engine
    if engine != "onnxruntime":  # its numbers, not ONNX Runtime's on the same file
        def top_score(x):
            return TopK(meta.classes, 1)(x)[2][:, 0]

        served_scores = np.array([p.scores[0] for p in preds])
        ort = make_runner("onnxruntime", onnx_path.read_bytes(), threads=0)(inputs)
        assert np.abs(served_scores - top_score(logits)).max() < np.abs(served_scores - top_score(ort)).max()
    params = read_configs(repo)[layouts.get(read_manifest(repo)["layout"]).onnx_model].parameters
    assert params["onnx_sha256"].string_value == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert (params["engine"].string_value, params["inference_precision"].string_value) == \
        (engine, served.inference_precision)  # and serves that very artifact, on that engine
    assert (read_manifest(repo)["engine"], read_manifest(repo)["precision"]) == (engine, precision)


def _with_speeds(artifacts: Path, out: Path, speeds: dict[str, float]) -> Path:
    """A copy of the artifacts whose report says these candidates ran at these speeds."""
    shutil.copytree(artifacts, out)
    report = json.loads((out / REPORT).read_text())
    for name, r in report["artifacts"].items():
        r["latency"]["best_images_per_s"] = speeds.get(name, 1.0)
    (out / REPORT).write_text(json.dumps(report))
    return out


def test_served_engine_is_the_fastest_that_passed_the_gate(artifacts, tmp_path, capsys):
    fast_ov = _with_speeds(artifacts, tmp_path / "a", {"fp32": 100, "openvino_fp32": 120, "openvino_bf16": 300,
                                                       "int8_ort": 200, "openvino_int8": 250})
    assert served_for("fp32", fast_ov)[1].engine == "openvino"  # 20% faster: OpenVINO serves FP32
    assert served_for("fp32", fast_ov, "onnxruntime")[1] == CANDIDATES["fp32"]
    assert served_for("int8", fast_ov)[1] == CANDIDATES["openvino_int8"]
    assert served_for("int8", fast_ov, "onnxruntime")[1] == CANDIDATES["int8_ort"]
    assert served_for("auto", fast_ov) == (fast_ov / "model.onnx", CANDIDATES["openvino_bf16"])
    # within the margin, ONNX Runtime stays: equal engines do not swap on timing noise
    close = _with_speeds(artifacts, tmp_path / "b", {"fp32": 100, "openvino_fp32": 103})
    assert served_for("fp32", close)[1] == CANDIDATES["fp32"]
    # a candidate that failed the gate is never served, however fast
    report = json.loads((fast_ov / REPORT).read_text())
    (fast_ov / REPORT).write_text(json.dumps({**report, "gate_failures": ["openvino_bf16"]}))
    assert served_for("auto", fast_ov)[1] == CANDIDATES["openvino_int8"]
    with pytest.raises(ValueError, match="no candidate for PRECISION=bf16 was measured and passed"):
        served_for("bf16", fast_ov)
    with pytest.raises(ValueError, match=r"onnxruntime does not serve bf16 on the CPU \(it serves fp16, fp32, int8\)"):
        served_for("bf16", fast_ov, "onnxruntime")
    # a report measured on another model.onnx (exported since) is not used: FP32 as exported, bf16 refused
    shutil.copy(artifacts / "model_int8.onnx", fast_ov / "model.onnx")
    assert served_for("fp32", fast_ov) == (fast_ov / "model.onnx", CANDIDATES["fp32"])
    assert "was measured on another model.onnx" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="run `make quantize` first .*bf16 needs it"):
        served_for("bf16", fast_ov, "openvino")
    assert served_for("fp32", fast_ov, "openvino")[1] == CANDIDATES["openvino_fp32"]  # f32: exact, no gate needed


def test_gpu_repository_configs(artifacts, tmp_path):
    repo = tmp_path / "gpu"
    # the layout with a Python postprocess model (the default GPU layout has none: tests/test_gpu_target.py)
    render(artifacts / "model_fp16.onnx", repo, RepoSettings(max_batch_size=16, preferred_batch_sizes=(4, 8)),
           target="gpu", layout="postprocess")
    configs = read_configs(repo)
    check_ensemble(configs)
    pre, cls, post = configs[P.PREPROCESS], configs[P.CLASSIFIER], configs[P.POSTPROCESS]
    assert pre.backend == "dali"
    assert pre.input[0].allow_ragged_batch
    assert cls.platform == "tensorrt_plan"
    assert [t.name for t in cls.input] == ["input"]
    assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in (*pre.instance_group, *cls.instance_group))
    assert list(cls.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cls.model_warmup[0].batch_size == 8
    assert cls.model_warmup[0].inputs["input"].zero_data
    assert post.backend == "python"
    assert (repo / P.POSTPROCESS / "1" / "model.py").exists()
    # the DALI backend serializes dali.py itself (its decoder: tests/test_gpu_target.py)
    assert (repo / P.PREPROCESS / "1" / "dali.py").exists()
    assert not (repo / P.PREPROCESS / "1" / "model.dali").exists()
    assert not (repo / P.PREPROCESS / "1" / "model.py").exists()


def test_gpu_repository_needs_float32_io(artifacts, tmp_path):
    model = onnx.load(str(artifacts / "model_fp16.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(tmp_path / "fp16_io.onnx"))
    with pytest.raises(ValueError, match="input is FLOAT16"):
        render(tmp_path / "fp16_io.onnx", tmp_path / "gpu", target="gpu")
    assert not (tmp_path / "gpu").exists()


def test_plan_from_another_onnx_is_refused(artifacts, tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    Path(f"{plan}.json").write_text(json.dumps({"onnx_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="built from another ONNX"):
        render(artifacts / "model_fp16.onnx", tmp_path / "gpu", target="gpu", plan=plan)
    assert not (tmp_path / "gpu").exists()  # refused before anything was written


def test_plan_profile_must_cover_the_repository_batch(artifacts, tmp_path):
    onnx_path = artifacts / "model_fp16.onnx"
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    Path(f"{plan}.json").write_text(json.dumps({"onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                                                "profile": {"min": 1, "opt": 8, "max": 16}}))
    with pytest.raises(ValueError, match="accepts batches up to 16 .* max_batch_size is 32"):
        render(onnx_path, tmp_path / "gpu", RepoSettings(max_batch_size=32), target="gpu", plan=plan)
    assert not (tmp_path / "gpu").exists()
    render(onnx_path, tmp_path / "gpu", RepoSettings(max_batch_size=16), target="gpu", plan=plan)
    assert (tmp_path / "gpu" / P.CLASSIFIER / "1" / "model.plan").read_bytes() == b"plan"


def test_served_plan_is_verified_against_the_runtime(artifacts, tmp_path):
    onnx_path = artifacts / "model_fp16.onnx"
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    Path(f"{plan}.json").write_text(json.dumps({
        "tensorrt_version": "10.5.0", "compute_capability": "9.0", "gpu_name": "NVIDIA H100", "precision": "fp16",
        "profile": {"min": 1, "opt": 16, "max": 32}, "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "strongly_typed": False}))
    repo = tmp_path / "gpu"
    with pytest.raises(EngineEnvironmentError, match="model.plan is missing"):
        verify_repository(repo, "10.5.0", "9.0")
    render(onnx_path, repo, RepoSettings(max_batch_size=32), target="gpu", plan=plan)
    assert verify_repository(repo, "10.5.0", "9.0").gpu_name == "NVIDIA H100"  # the stamp travelled with the plan
    with pytest.raises(EngineEnvironmentError, match="this GPU is 8.6"):
        verify_repository(repo, "10.5.0", "8.6")


def test_engine_profile_follows_the_gpu_repository(artifacts, tmp_path):
    from build import engine

    repo = tmp_path / "gpu"
    render(artifacts / "model_fp16.onnx", repo, RepoSettings(max_batch_size=24, preferred_batch_sizes=(4, 12)),
           target="gpu")
    base = ["--onnx", "x.onnx", "--precision", "fp16", "--out", "x.plan", "--repo", str(repo)]
    s = repo_settings(engine.get_args_parser().parse_args(base), repo)
    assert BatchProfile.from_repo_settings(s.max_batch_size, s.preferred_batch_sizes) == BatchProfile(1, 12, 24)
    s = repo_settings(engine.get_args_parser().parse_args(base + ["--max-batch-size", "8"]), repo)
    assert BatchProfile.from_repo_settings(s.max_batch_size, s.preferred_batch_sizes) == BatchProfile(1, 8, 8)


def test_plan_stamp_mismatch_is_refused(tmp_path):
    stamp = tmp_path / "model.plan.json"
    stamp.write_text(json.dumps({"tensorrt_version": "10.5.0", "compute_capability": "9.0", "gpu_name": "NVIDIA H100",
                                 "precision": "fp16", "profile": {"min": 1, "opt": 16, "max": 32},
                                 "onnx_sha256": "x", "strongly_typed": False}))
    assert check_plan(stamp, "10.5.0", "9.0").gpu_name == "NVIDIA H100"
    with pytest.raises(EngineEnvironmentError, match="built with TensorRT 10.5.0, this runtime is TensorRT 11.0.1"):
        check_plan(stamp, "11.0.1", "9.0")
    with pytest.raises(EngineEnvironmentError, match=r"compute capability 9.0 \(NVIDIA H100\), this GPU is 8.9"):
        check_plan(stamp, "10.5.0", "8.9")
    with pytest.raises(EngineEnvironmentError, match="build stamp is needed"):
        check_plan(tmp_path / "missing.json", "10.5.0", "9.0")


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a GPU and TensorRT: the refusal does not apply")
def test_make_engine_stops_cleanly_without_gpu(artifacts):
    out = artifacts / "model_fp16.plan"
    r = subprocess.run([sys.executable, "-m", "build.engine", "--onnx", str(artifacts / "model_fp16.onnx"),
                        "--precision", "fp16", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "missing an NVIDIA GPU" in r.stderr
    assert "make -C docker engine" in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "build.engine", "--verify", str(artifacts)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "missing an NVIDIA GPU" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(["make", "-s", "gpu-check", f"ARTIFACTS={artifacts}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode != 0
    assert "cannot build a TensorRT engine here" in r.stderr
    assert "Traceback" not in r.stderr


def test_dali_decoder_ignores_zero_padding(onnx_model, val_files):
    """Clients zero-pad the rows of a multi-image request; the GPU target's DALI backend decodes them as
    they are (no Python strip), so the decoder must stop at the image's end. Checked here on the CPU
    decoder; test_dali_gpu_pipeline_matches_cpu checks nvJPEG."""
    spec = read_metadata(onnx_model).preprocess
    blobs = [f.read_bytes() for f in val_files[:4]]
    pre = DaliPreprocessor(spec, batch_size=4)
    assert np.array_equal(pre(blobs), pre([b + b"\x00" * 700 for b in blobs]))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA_GPU is not None, reason=f"DALI GPU pipeline not runnable: {NO_CUDA_GPU}")
def test_dali_gpu_pipeline_matches_cpu(onnx_model, val_files):
    """One definition, two devices: nvJPEG + GPU resize/normalize against the CPU pipeline, same images."""
    from perf.checks.gpu_check import dali_gpu_vs_cpu

    spec = read_metadata(onnx_model).preprocess
    diff = dali_gpu_vs_cpu(spec, val_files, batch=16)
    assert diff["images"] == min(16, len(val_files))
    # nvJPEG and libjpeg-turbo round differently; normalized, one 8-bit level is about 0.017: on average the
    # two devices agree within 3 levels (a wrong channel order, scale or crop is far beyond that)
    assert diff["mean_abs_diff"] < 0.05, diff
    assert diff["max_abs_diff"] < 0.5, diff
    assert not diff["padding_changes_output"]  # the DALI backend gets zero-padded rows, nothing strips them


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=f"GPU path not runnable here: {NO_GPU}")
def test_gpu_check(artifacts, tiny_data):
    from perf.checks import gpu_check

    # 80 val images: one image is 1.25 points, so the 1-point gate and 99% agreement would fail on a single
    # flipped image (FP16/INT8 vs FP32 may flip one); allow two, as the artifacts fixture does
    val = len(list((tiny_data / "val").rglob("*.jpg")))
    tolerance = 2 * 100 / val
    args = gpu_check.get_args_parser().parse_args(["--artifacts", str(artifacts), "--data", str(tiny_data),
                                                   "--max-top1-drop", str(tolerance),
                                                   "--min-served-agreement", str(100 - tolerance)])
    assert gpu_check.main(args) == 0


def test_graph_cleanup_removes_identities_and_folds_constants():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    a = helper.make_tensor("a", TensorProto.FLOAT, [4], [1, 2, 3, 4])
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], [2, 2, 2, 2])
    nodes = [helper.make_node("Identity", ["x"], ["x1"]),
             helper.make_node("Mul", ["a", "b"], ["ab"]),           # constant subgraph: folded
             helper.make_node("Add", ["x1", "ab"], ["y"]),
             helper.make_node("Neg", ["x"], ["unused"])]            # dead: removed
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [a, b]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {"platform": "{}"})
    cleaned, counts = clean(model)
    assert counts == {"nodes_before": 4, "nodes_after": 1, "identities_removed": 1}
    assert [n.op_type for n in cleaned.graph.node] == ["Add"]
    assert cleaned.metadata_props[0].key == "platform"
    data = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    before = ort_session(model.SerializeToString(), 0).run(None, {"x": data})[0]
    after = ort_session(cleaned.SerializeToString(), 0).run(None, {"x": data})[0]
    np.testing.assert_allclose(after, before)


def test_kubernetes_manifests_validate(tmp_path):
    validate = str(Path(sys.executable).parent / "kubernetes-validate")
    manifests = sorted(p for p in (ROOT / "docker" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    r = subprocess.run([validate, "--strict", *map(str, manifests)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # and the validator does catch a wrong field: replicas as a string in a copy of the Deployment
    docs = [d for m in manifests for d in yaml.safe_load_all(m.read_text()) if d and d.get("kind") == "Deployment"]
    docs[0]["spec"]["replicas"] = "two"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(docs[0]))
    r = subprocess.run([validate, "--strict", str(broken)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "replicas" in r.stdout + r.stderr


def outlier_channels(onnx_model: Path, out: Path, inputs: np.ndarray, factor: float = 1000.0,
                     channels: int = 3) -> list[tuple[str, str]]:
    """A copy of the model with the same function and outlier channels in every residual branch, the
    activation shape transformers are known for: in each Conv -> Relu -> Conv chain the ``channels`` most
    active on ``inputs`` are multiplied by ``factor`` and the next conv's weights for them divided by it (ReLU
    commutes with a positive scale). Returns each chain's (conv writing the outliers, conv reading them)."""
    model = onnx.load(str(onnx_model))
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    chains = []
    for conv in model.graph.node:
        relu = consumers.get(conv.output[0], [])
        if conv.op_type == "Conv" and len(conv.input) == 3 and len(relu) == 1 and relu[0].op_type == "Relu":
            nxt = consumers.get(relu[0].output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == "Conv":
                chains.append((conv, relu[0].output[0], nxt[0]))
    assert len(chains) >= 3, "the model has no residual branches to put outliers in"
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(r, TensorProto.FLOAT, None) for _, r, _ in chains)
    activations = ort_session(probe.SerializeToString()).run([r for _, r, _ in chains], {"input": inputs})

    def scale(name: str, index: tuple, by: float) -> None:
        a = onnx.numpy_helper.to_array(inits[name]).copy()
        a[index] *= by
        inits[name].CopyFrom(onnx.numpy_helper.from_array(a, name))

    for (conv, _, nxt), activation in zip(chains, activations, strict=True):
        # the most active channels (a dead one scales to nothing), several: with one outlier channel per branch,
        # entropy calibration's clipping cost one CI run's model so little that it passed the gate
        for channel in np.argsort(-activation.mean(axis=(0, 2, 3)))[:channels].tolist():
            scale(conv.input[1], (channel,), factor)
            scale(conv.input[2], (channel,), factor)
            scale(nxt.input[1], (slice(None), channel), 1 / factor)
    onnx.save(model, str(out))
    return [(conv.name, nxt.name) for conv, _, nxt in chains]


def test_int8_failing_the_gate_is_recovered_by_keeping_its_sensitive_layers_in_fp32(onnx_model, tiny_data,
                                                                                     val_files, tmp_path,
                                                                                     monkeypatch):
    """Outlier channels leave FP32 as it was and ruin per-tensor INT8: the first ONNX Runtime INT8 file fails
    the gate; the build ranks the layers by what INT8 costs the
    logits (each of the convs writing or reading an outlier, quantized alone, ruins them), keeps those in
    FP32, passes, writes that file, and reports every try."""
    x = DaliPreprocessor(read_metadata(onnx_model).preprocess).files(val_files[:16])
    chains = outlier_channels(onnx_model, tmp_path / "model.onnx", x)
    sensitive = {name for chain in chains for name in chain}
    a, b = (logits_of("onnxruntime", p.read_bytes(), x) for p in (onnx_model, tmp_path / "model.onnx"))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # the same function in FP32
    # the plan tries the other calibration method first; on some trained models entropy calibration's clipping
    # already passes this gate (one CI run), which would end recovery before any layer is kept: here it is
    # left out, and its place in the plan is checked on the plan itself
    plan = quantize.recovery_plan
    assert plan("max", [("a", 1.0)])[0] == ("entropy", [])
    monkeypatch.setattr(quantize, "recovery_plan", lambda method, ranked: plan(method, ranked)[1:])
    report = quantize.build(tmp_path / "model.onnx", tiny_data, tmp_path, calib_size=32, max_top1_drop=2.5,
                            precisions=("int8_ort",), engines=("onnxruntime",), min_agreement=0.0)
    recovery = report["int8_recovery"]["int8_ort"]
    first, last = recovery["tries"][0], recovery["tries"][-1]
    base = report["artifacts"]["fp32"]["top1"]
    assert first["top1"] < base - 10, recovery
    assert not first["passed"], recovery
    assert set(list(recovery["sensitivity_db"])[:len(sensitive)]) == sensitive, recovery["sensitivity_db"]
    assert recovery["recovered"], recovery
    assert last["passed"], recovery
    assert sensitive <= set(last["kept_fp32"]), recovery
    assert report["artifacts"]["int8_ort"]["top1"] >= base - 2.5
    assert "int8_ort" not in report["gate_failures"]
    path = tmp_path / ARTIFACT_NAMES["int8_ort"]
    assert list(read_metadata(path).export.kept_fp32) == last["kept_fp32"]
    # each conv reading an outlier reads it in float: no DequantizeLinear in front of it
    served = onnx.load(str(path))
    dq = {o for n in served.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    readers = {reader for _, reader in chains}
    assert all(n.input[0] not in dq for n in served.graph.node if n.name in readers)
    assert "INT8 recovery" in (tmp_path / "build_report.md").read_text()


@pytest.mark.server
def test_repository_batch_and_instances_follow_the_models_measured_cost(artifacts, val_files, tmp_path, capsys):
    """`make repo` sets the batcher's preferred batch to the smallest one make quantize measured within 95% of
    the served candidate's best throughput (a costly model: 8 of these, not none), and its instances to one per
    core for a model that costs over LIGHT_MS_PER_IMAGE of a core per image, one more below it, unless
    PREFERRED / INSTANCES pins it (given, or in the deployment file); a cheap model gets 32.
    The largest request the server accepts stays max_batch_size (32): a client's 32-image request is answered
    after a re-render that fits a batch of 8."""
    from build import render_repo

    work = tmp_path / "artifacts"
    work.mkdir()
    shutil.copy(artifacts / "model.onnx", work / "model.onnx")
    report = json.loads((artifacts / REPORT).read_text())
    report["cpu"]["cores"] = 2  # the throughputs below were measured on 2 cores
    cores = os.cpu_count() or 1

    def measured(images_per_s: dict[int, float]) -> None:
        for row in report["artifacts"].values():
            row["latency"]["by_batch"] = {str(b): {"ms": 1000 * b / r, "images_per_s": r}
                                          for b, r in images_per_s.items()}
        (work / REPORT).write_text(json.dumps(report))

    def rendered(*flags: str, field: str = "preferred_batch_sizes") -> object:
        render_repo.main(render_repo.get_args_parser().parse_args(
            ["--artifacts", str(work), "--out", str(tmp_path / "repo"), "--precision", "fp32", *flags]))
        return read_manifest(tmp_path / "repo")["settings"][field]

    measured({1: 90, 8: 520, 16: 540, 32: 530})  # a 224-px model: nothing gained past 8
    assert rendered() == [8]
    assert re.search(r"preferred_batch_sizes +8 +fitted \(\w+'s measured cost: 520 img/s at batch 8",
                     capsys.readouterr().out)
    assert rendered(field="max_batch_size") == 32  # the contract with the clients is unchanged
    configs = read_configs(tmp_path / "repo")
    assert list(configs["classify"].dynamic_batching.preferred_batch_size) == [8]
    assert configs["classify"].max_batch_size == 32
    with TritonServer(tmp_path / "repo", None, log_file=tmp_path / "server.log") as server, \
            ImageClassifierClient(server.http_url) as client:
        files = (val_files * 4)[:32]
        answers = client.classify([f.read_bytes() for f in files], [str(f) for f in files], batch_size=32)
        assert [a.ok for a in answers] == [True] * 32
    assert rendered("--reset-settings", field="classifier_instances") == cores  # 3.7 ms of a core per image
    assert rendered("--reset-settings", "--classifier-instances", "5", field="classifier_instances") == 5
    measured({1: 90, 8: 400, 16: 510, 32: 530})  # 400 < 0.95 x 530 <= 510
    assert rendered("--reset-settings") == [16]
    assert rendered("--preferred-batch-sizes", "4") == [4]  # PREFERRED wins
    assert rendered() == [4]  # and stays pinned in the deployment file
    assert rendered("--reset-settings") == [16]  # until the pins go: fitted again
    measured({1: 900, 8: 3000, 16: 4500, 32: 6000})  # a cheap model
    assert rendered("--reset-settings") == [32]
    assert rendered("--reset-settings", field="classifier_instances") == cores + 1  # 0.33 ms


def test_quantize_leaves_the_fp32_model_as_it_was(onnx_model, tiny_data, tmp_path):
    """ModelOpt's INT8 quantizer runs onnx.shape_inference.infer_shapes_path on the path it is given, which
    writes the inferred model back over it: a model without value_info (a timm ConvNeXt, or this one with
    it removed) came out of make quantize changed, and its build report no longer matched it."""
    model = onnx.load(str(onnx_model))
    del model.graph.value_info[:]
    onnx.save(model, str(tmp_path / "model.onnx"))
    before = (tmp_path / "model.onnx").read_bytes()
    quantize.build(tmp_path / "model.onnx", tiny_data, tmp_path, calib_size=16, **GATE_OPEN,
                   precisions=("int8",), engines=("onnxruntime",))
    assert (tmp_path / "model.onnx").read_bytes() == before
    assert served_for("int8", tmp_path)[0].name == ARTIFACT_NAMES["int8"]  # the report is the file's


def test_every_long_step_of_quantize_says_what_it_does(onnx_model, tiny_data, tmp_path, capsys):
    """Conversion, scoring, timing and the isolated engine's pass each print a line before they start (a log
    or a pipe shows them; the bars beside them only draw on a terminal)."""
    quantize.build(onnx_model, tiny_data, tmp_path, calib_size=8, **GATE_OPEN, precisions=("fp16",))
    out = capsys.readouterr().out
    val_images = len(list((tiny_data / "val").rglob("*.jpg")))
    for line in ("converting fp16 ...", f"on {val_images} val images ...", "timing fp32, fp16 at batches",
                 "in a process of their own"):
        assert line in out, (line, out)
    assert out.index("converting fp16 ...") < out.index("scoring") < out.index("timing")
