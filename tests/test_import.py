"""A model trained elsewhere comes in as ONNX: plain torch.onnx from a timm model, without the project's
metadata, imported (checked, batch made dynamic, softmax added), quantized and served like any export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import GATE_OPEN

from build import import_onnx, quantize
from build.import_onnx import ImportCheckError
from build.render_repo import render
from build.settings import RepoSettings
from clients.client import ImageClassifierClient
from core.metadata import file_sha256, read_metadata, source_checkpoint
from core.preprocess import DaliPreprocessor
from core.runners import OrtRunner
from serve.server import TritonServer
from training.data import find_classes
from training.real_datasets import write_imagefolder

SIZE = 32


def plain_export(model: torch.nn.Module, path: Path, softmax: bool = False, nhwc: bool = False) -> Path:
    """What a user of another tool hands over: torch.onnx's classic exporter, batch fixed at 1, their names."""
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.model(x.permute(0, 3, 1, 2) if nhwc else x)
            return torch.softmax(y, 1) if softmax else y

    shape = (1, SIZE, SIZE, 3) if nhwc else (1, 3, SIZE, SIZE)
    torch.onnx.export(Wrapped().eval(), (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["scores"])
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A real data set a package ships: scikit-learn's handwritten digits (10 classes, 32 px)."""
    return write_imagefolder("digits", tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def timm_classifier(digits) -> torch.nn.Module:
    import timm

    torch.manual_seed(5)
    return timm.create_model("test_convnext", num_classes=len(find_classes(digits / "train"))).eval()


@pytest.fixture(scope="module")
def labels(digits, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(find_classes(digits / "train")) + "\n")
    return path


def options(**kw: object) -> argparse.Namespace:
    return import_onnx.get_args_parser().parse_args(
        ["--onnx", "x", "--labels", "x", *[a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]])


@pytest.fixture(scope="module")
def imported(timm_classifier, labels, digits, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("import")
    src = plain_export(timm_classifier, work / "theirs.onnx")
    out = work / "model.onnx"
    import_onnx.import_onnx(src, labels, out, options(like="timm:test_convnext", img_size=SIZE, data=digits))
    return out


def test_import_checks_fixes_and_records_the_model(imported, timm_classifier, labels):
    meta = read_metadata(imported)
    src = Path(meta.source.imported)
    assert meta.arch == "imported"
    assert meta.source.imported_sha256 == file_sha256(src)
    assert list(meta.classes) == labels.read_text().split()
    assert meta.source.fixes["dynamic_batch"] is True
    spec = meta.preprocess
    assert (spec.interpolation, spec.mean) == ("cubic", (0.5, 0.5, 0.5))  # timm's test_convnext eval transform
    graph = onnx.load(str(imported)).graph
    assert [o.name for o in graph.output] == ["logits", "probabilities"]
    assert graph.input[0].name == "input"
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    logits, probs = OrtRunner(imported).run(x, outputs=2)  # batch 3: the batch is dynamic now
    with torch.inference_mode():
        np.testing.assert_allclose(logits, timm_classifier(torch.from_numpy(x)).numpy(), atol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="was imported from"):
        source_checkpoint(imported)


def test_a_softmax_output_becomes_logits_again(timm_classifier, labels, tmp_path):
    src = plain_export(timm_classifier, tmp_path / "probs.onnx", softmax=True)
    out = tmp_path / "model.onnx"
    import_onnx.import_onnx(src, labels, out, options(like="timm:test_convnext", img_size=SIZE))
    assert read_metadata(out).source.fixes["softmax_turned_to_logits"] is True
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    logits, probs = OrtRunner(out).run(x, outputs=2)
    with torch.inference_mode():
        expected = torch.softmax(timm_classifier(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert not np.allclose(np.exp(logits).sum(1), 0)


def test_what_cannot_be_served_is_refused_with_the_reason(timm_classifier, labels, tmp_path):
    nhwc = plain_export(timm_classifier, tmp_path / "nhwc.onnx", nhwc=True)
    with pytest.raises(ImportCheckError, match="this looks like NHWC"):
        import_onnx.import_onnx(nhwc, labels, tmp_path / "a.onnx", options(img_size=SIZE))
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    src = plain_export(timm_classifier, tmp_path / "theirs.onnx")
    with pytest.raises(ImportCheckError, match=r"expected \[batch, 3\]"):
        import_onnx.import_onnx(src, three, tmp_path / "b.onnx", options(img_size=SIZE))
    with pytest.raises(ImportCheckError, match="fixed at"):
        import_onnx.import_onnx(src, labels, tmp_path / "c.onnx", options(img_size=SIZE * 2))
    assert not any((tmp_path / n).exists() for n in ("a.onnx", "b.onnx", "c.onnx"))  # nothing half-written


@pytest.mark.server
def test_the_imported_model_is_quantized_and_served_as_onnx_runtime_computes(imported, digits, tmp_path):
    val_files = sorted((digits / "val").rglob("*.jpg"))
    report = quantize.build(imported, digits, tmp_path, calib_size=16, **GATE_OPEN,
                            precisions=("int8_ort",))
    assert report["reference"] == "the imported FP32 ONNX"
    assert report["artifacts"]["fp32"]["max_abs_logit_diff"] == 0
    written = json.loads((tmp_path / "build_report.json").read_text())
    assert written["artifacts"]["int8_ort"]["top1"] >= 0
    # a file another engine cannot compile (OpenVINO 2026.4 fails on some Q/DQ transformer blocks) is recorded
    # with the engine's own error and never served
    for name, u in written["unsupported"].items():
        assert u["engine"] == "openvino"
        assert u["error"]
        assert name not in written["serving"].values()
    meta = read_metadata(imported)
    reference = np.concatenate([OrtRunner(imported)(x) for x in
                                DaliPreprocessor(meta.preprocess).iter_files(val_files)])
    repo = tmp_path / "repo"
    render(imported, repo, RepoSettings(max_batch_size=8, classifier_instances=1))
    with TritonServer(repo, None, log_file=tmp_path / "server.log") as server, \
            ImageClassifierClient(server.http_url, timeout_s=60) as client:
        served = client.classify_files(val_files)
    assert [p.labels[0] for p in served] == [meta.classes[i] for i in reference.argmax(1)]


@pytest.mark.server
def test_a_report_measures_the_imported_models_repository(imported, digits, tmp_path):
    """make perf / loadtest / compare / report on a repository built from an imported model: everything is
    measured; the naive baseline, which serves a PyTorch checkpoint, is left out with a line saying why."""
    from dataclasses import replace

    from perf import report

    repo = tmp_path / "repo"
    render(imported, repo, RepoSettings(max_batch_size=8, classifier_instances=1))
    profile = replace(report.QUICK, parts=("ceiling", "compare", "perf", "loadtest"), concurrency=(1,),
                      locust_users=2, locust_seconds=2, request_count=30)
    out = report.run(repo, digits / "val", tmp_path / "reports", profile, browser=False)
    results = json.loads((out / "results.json").read_text())
    assert results["headline"]["triton_rps"] > 0
    assert "baseline_ratio" not in results["headline"]
    assert set(results["locust"]) == {"TritonHttpUser", "TritonGrpcUser"}
    assert "baseline" not in results["compare"]["summary"]
    assert "was imported (make import)" in results["baseline_left_out"]
    md = (out / "report.md").read_text()
    assert "**No naive baseline**" in md
    assert (out / "triton_vs_baseline_vs_ceiling.png").read_bytes()[:4] == b"\x89PNG"
