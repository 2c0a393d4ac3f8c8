"""`make import` of a classifier exported at batch 1 with the batch fixed inside its graph (a Reshape to [1, ...]):
the graph is made dynamic where the Reshape provably holds the batch, and proved against the original one
image at a time; where it cannot be, the model is imported with its batch fixed, says so, and is served one
image per inference call, answering a request of several images as the original does."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from build import import_onnx
from build.render_repo import render
from build.settings import RepoSettings
from core.metadata import read_metadata
from core.runners import OrtRunner
from served.engines import in_fixed_batches

SIZE, CLASSES = 32, 10


class ViewOne(torch.nn.Module):
    """A small CNN whose head flattens with ``x.view(1, -1)``: exported at batch 1, the Reshape's shape is [1, -1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.fc = torch.nn.Linear(8 * 7 * 7, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).view(1, -1))


class Mixing(torch.nn.Module):
    """A head that folds the batch into the channels (``view(C, -1)``, as a batch-1 graph may): no Reshape
    rewrite makes that per-image, so the import keeps the batch fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(8, -1).mean(1).view(1, 8))


def batch_one_export(model: torch.nn.Module, path: Path, dynamo: bool = False) -> Path:
    """What a user hands over: exported at batch 1 with no dynamic axes (torch.onnx's classic exporter, or the
    torch.export-based one, which writes every Reshape with the batch it traced)."""
    torch.manual_seed(0)
    with torch.no_grad():  # random but fixed batch-norm statistics, so that they matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=dynamo,
                      **({} if dynamo else {"opset_version": 17}))
    return path


def reshape_targets(path: Path) -> list[list[int]]:
    """The fixed target shapes of the graph's Reshapes (initializers or Constant nodes)."""
    graph = onnx.load(str(path)).graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    values.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant"})
    return [values[n.input[1]].tolist() for n in graph.node if n.op_type == "Reshape" and n.input[1] in values]


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("".join(f"class_{i}\n" for i in range(CLASSES)))
    return path


def make_import(src: Path, labels: Path, out: Path) -> dict:
    """`make import ONNX=src LABELS=labels`: the module's own command line."""
    return import_onnx.main(import_onnx.get_args_parser().parse_args(
        ["--onnx", str(src), "--labels", str(labels), "--out", str(out)]))


def one_at_a_time(original: Path, x: np.ndarray) -> np.ndarray:
    session = OrtRunner(original)
    return np.concatenate([session(xi[None]) for xi in x])


def inputs(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("source", ["view(1, -1), classic exporter", "torchvision SqueezeNet, torch.export"])
def test_a_batch_fixed_in_a_reshape_is_made_dynamic_and_proved(source, labels, tmp_path, capsys):
    if source.startswith("torchvision"):
        import torchvision

        src = batch_one_export(torchvision.models.squeezenet1_1(num_classes=CLASSES), tmp_path / "theirs.onnx",
                               dynamo=True)
    else:
        src = batch_one_export(ViewOne(), tmp_path / "theirs.onnx")
    assert any(target[0] == 1 for target in reshape_targets(src))  # the batch is baked in
    out = tmp_path / "model.onnx"
    report = make_import(src, labels, out)
    printed = capsys.readouterr().out
    assert "batch: made dynamic" in printed
    assert "proved: at batch 1 and 3" in printed
    assert report["fixed_batch"] is None
    meta = read_metadata(out)
    assert meta.export.fixed_batch is None
    assert meta.source.fixes["dynamic_batch"] is True
    assert meta.source.fixes["reshapes_following_the_batch"]
    assert isinstance(onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param, str)
    assert all(target[0] == -1 for target in reshape_targets(out))
    imported = OrtRunner(out)
    assert imported.fixed_batch is None  # one call for the whole batch
    for n in (1, 3):
        x = inputs(n)
        np.testing.assert_allclose(imported(x), one_at_a_time(src, x), atol=1e-5)


def test_in_fixed_batches_calls_with_exactly_the_graphs_batch():
    calls: list[int] = []

    def run(batch: np.ndarray) -> list[np.ndarray]:
        calls.append(len(batch))
        assert len(batch) == 2
        return [batch.sum(axis=(1, 2)), batch[:, 0, 0] * 10]

    x = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2)
    sums, firsts = in_fixed_batches(run, x, 2)
    assert calls == [2, 2, 2]  # the last image filled up with a copy of itself, its copy's row dropped
    np.testing.assert_array_equal(sums, x.sum(axis=(1, 2)))
    np.testing.assert_array_equal(firsts, x[:, 0, 0] * 10)
    assert in_fixed_batches(lambda b: [b], x, None)[0] is x  # a varying batch: one call


@pytest.fixture(scope="module")
def fixed(labels, tmp_path_factory) -> tuple[Path, Path, dict, str]:
    """(the batch-1 original, its import, make import's report, what it printed) of a model no rewrite proves."""
    work = tmp_path_factory.mktemp("fixed")
    src = batch_one_export(Mixing(), work / "theirs.onnx")
    out = work / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = make_import(src, labels, out)
    return src, out, report, printed.getvalue()


def test_what_cannot_be_proved_is_imported_with_its_batch_fixed_and_says_what_it_costs(fixed):
    src, out, report, printed = fixed
    assert "batch: fixed at 1 inside the graph" in printed
    assert "one image per inference call" in printed
    assert report["fixed_batch"] == 1
    assert "one image per inference call" in report["batch"]
    meta = read_metadata(out)
    assert meta.export.fixed_batch == 1
    assert meta.source.fixes["dynamic_batch"] is False
    assert "at batch 3" in meta.source.fixes["batch_kept_fixed"]  # the failed proof, in its words
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = inputs(5)
    expected = one_at_a_time(src, x)
    runner = OrtRunner(out)
    np.testing.assert_allclose(runner(x), expected, atol=1e-5)  # a batch of 5 as 5 calls
    logits, probs = runner.run(x, outputs=2)
    np.testing.assert_allclose(probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-6)


def test_the_served_engines_run_a_fixed_batch_one_image_per_call(fixed):
    from core.runners import isolated, logits_of
    from served.stages import make_classifier

    src, out, _, _ = fixed
    x = inputs(4, seed=11)
    expected = one_at_a_time(src, x)
    np.testing.assert_allclose(make_classifier("onnxruntime", out)(x)[0], expected, atol=1e-5)
    # OpenVINO in a process of its own, as every measurement runs it (served/engines.py, OvRunner)
    np.testing.assert_allclose(isolated(logits_of, "openvino", str(out), x), expected, atol=1e-4)


def test_make_repo_says_what_a_fixed_batch_costs_and_the_gpu_target_refuses_it(fixed, tmp_path, capsys):
    _, out, _, _ = fixed
    render(out, tmp_path / "repo", RepoSettings(max_batch_size=8, classifier_instances=1))
    printed = capsys.readouterr().out
    assert "batch is fixed at 1 inside the graph" in printed
    assert "one image per inference call" in printed
    with pytest.raises(ValueError, match="fixed at 1 inside the graph"):
        render(out, tmp_path / "gpu", RepoSettings(max_batch_size=8), target="gpu")
    assert not (tmp_path / "gpu").exists()


@pytest.mark.server
def test_a_fixed_batch_model_is_served_answering_several_images_in_one_request(fixed, tmp_path):
    from PIL import Image

    from clients.client import ImageClassifierClient
    from core.preprocess import DaliPreprocessor
    from serve.server import TritonServer

    src, out, _, _ = fixed
    rng = np.random.default_rng(3)
    files = []
    for i in range(6):
        path = tmp_path / f"image_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path, quality=95)
        files.append(path)
    meta = read_metadata(out)
    logits = one_at_a_time(src, DaliPreprocessor(meta.preprocess).files(files))
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    repo = tmp_path / "repo"
    render(out, repo, RepoSettings(max_batch_size=8, classifier_instances=1))
    with TritonServer(repo, None, log_file=tmp_path / "server.log") as server, \
            ImageClassifierClient(server.http_url, timeout_s=60) as client:
        served = client.classify_files(files, batch_size=len(files))  # one request of 6 images
    assert all(p.ok for p in served), [p.error for p in served]
    for p, row in zip(served, expected, strict=True):  # each image as the original answers it alone
        np.testing.assert_allclose(p.scores, np.sort(row)[::-1][:len(p.scores)], atol=1e-4)
        assert p.labels[0] == meta.classes[int(row.argmax())]


def test_a_fixed_batch_model_is_quantized_from_a_folder_of_images(fixed, tiny_data, tmp_path):
    """ONNX Runtime's calibration feeds the graph its own batch (it fed 16 images at a time, which a batch-1
    graph refuses); the folder has no labels, so the gate judges agreement with the imported file."""
    from conftest import GATE_OPEN

    from build import quantize

    _, imported, _, _ = fixed
    shutil.copy(imported, tmp_path / "model.onnx")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(sorted((tiny_data / "val").rglob("*.jpg"))[:24]):
        shutil.copy(path, folder / f"{i}.jpg")
    report = quantize.build(tmp_path / "model.onnx", folder, tmp_path, calib_size=12, precisions=("int8_ort",),
                            engines=("onnxruntime",), **GATE_OPEN)
    assert report["labelled"] is False
    assert set(report["artifacts"]) == {"fp32", "int8_ort"}
    assert read_metadata(tmp_path / "model_int8_ort.onnx").export.fixed_batch == 1

