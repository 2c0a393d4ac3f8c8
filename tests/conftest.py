"""Session fixtures: one tiny data set, one tiny trained model, one rendered repository (the default,
fused layout) and ONE real tritonserver for the whole test session (spoken to over HTTP and gRPC); the
same model in the ensemble layout, with its own server for the tests that need one."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from build.export_onnx import export
from build.render_repo import render
from build.settings import RepoSettings
from serve.server import TritonServer
from training import synthetic, train

TINY = dict(num_classes=10, train_per_class=16, val_per_class=8, seed=3)
# The session fixtures that make a test slow: it needs the trained model, or a real server. A test whose
# fixtures include one of them is marked by it (pytest_collection_modifyitems), so that `make test-fast`
# (-m "not model and not server and not slow") runs the rest in seconds; a test that trains in its own body
# says so with an explicit @pytest.mark.model; one that starts TritonServer in its own body is marked server.
NEEDS = {"checkpoint": "model", "server": "server", "ensemble_server": "server",
         # the modules' own trained models
         "uninterrupted": "model", "finetuned": "model", "imported": "model", "pruned": "model"}
MAX_BATCH = 8  # small, so that "batch larger than max_batch_size" is cheap to send
# make quantize's gate wide open (top-1 and agreement), for tests about something else than the gate
GATE_OPEN = {"max_top1_drop": 100.0, "min_agreement": 0.0, "min_top5_overlap": 0.0}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        function = getattr(item, "function", None)
        if function is not None and "TritonServer(" in inspect.getsource(function):
            item.add_marker("server")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("data") / "synthetic", **TINY)


@pytest.fixture(scope="session")
def checkpoint(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    # a model that really classifies (about 90% top-1 on the tiny val split in a few seconds), so that
    # accuracy gates and fidelity checks compare meaningful predictions, not chance-level argmaxes
    args = train.parse_args(
        ["--data", str(tiny_data), "--out", str(out), "--img-size", "32", "--epochs", "12", "--batch-size", "16",
         "--workers", "0", "--quiet"])
    train.main(args)
    return out / "best.pt"


@pytest.fixture(scope="session")
def onnx_model(checkpoint, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export(checkpoint, tiny_data, out)
    return out


@pytest.fixture(scope="session")
def repo(onnx_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo")
    render(onnx_model, out, RepoSettings(max_batch_size=MAX_BATCH, top_k=3))
    return out


@pytest.fixture(scope="session")
def ensemble_repo(onnx_model, tmp_path_factory) -> Path:
    """The same model and settings in the three-model ensemble layout (the GPU target's shape)."""
    out = tmp_path_factory.mktemp("ensemble_repo")
    render(onnx_model, out, RepoSettings(max_batch_size=MAX_BATCH, top_k=3), layout="postprocess")
    return out


@pytest.fixture(scope="session")
def ensemble_server(ensemble_repo, tmp_path_factory):
    """Started only by the tests that look inside the ensemble (its composing models, their stubs)."""
    log = tmp_path_factory.mktemp("logs") / "tritonserver-ensemble.log"
    with TritonServer(ensemble_repo, None, log_file=log) as s:
        yield s


@pytest.fixture(scope="session")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(repo, None, log_file=log) as s:
        yield s


@pytest.fixture(scope="session")
def val_files(tiny_data) -> list[Path]:
    return sorted((tiny_data / "val").rglob("*.jpg"))


def worse_model(onnx_path: Path, out: Path, num_classes: int) -> Path:
    """The same model with its classifier's rows rolled by one: every prediction moves to the next class."""
    from perf.checks.monitor_check import rolled_classifier

    return rolled_classifier(onnx_path, out, num_classes)
