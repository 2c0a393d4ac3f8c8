"""Structured pruning with distillation recovery (training.prune, make prune) on a real data set:
scikit-learn's handwritten digits, trained here, pruned to half its FLOPs, recovered, gated, exported and
served side by side with the unpruned model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from build.export_onnx import export
from perf.ab import pruned as perf_pruned
from training import prune, train
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.models import build_model, layer_widths
from training.real_datasets import write_imagefolder
from training.sparsity import eligible, two_four_violations

pytestmark = [pytest.mark.model]  # prunes and fine-tunes models of its own

FAST = ["--workers", "0"]  # the fine-tuning run's data loading in-process (CI's two cores)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits data set and a model trained on it (about 98% val top-1 in a few seconds)."""
    work = tmp_path_factory.mktemp("digits")
    data = write_imagefolder("digits", work / "data")
    train.main(train.parse_args(["--data", str(data), "--out", str(work / "run"), "--quiet", "--epochs", "6",
                                 "--img-size", "32", *FAST]))
    return data, work / "run" / "best.pt"


def run_prune(data, ckpt, out, *flags):
    return prune.main(prune.get_args_parser().parse_args(
        ["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), *flags, "--train-args", *FAST]))


@pytest.fixture(scope="module")
def pruned(digits, tmp_path_factory):
    data, ckpt = digits
    out = tmp_path_factory.mktemp("pruned")
    return run_prune(data, ckpt, out, "--target-flops", "0.5", "--epochs", "6"), out


def test_pruning_halves_the_flops_and_distillation_recovers_the_accuracy(digits, pruned):
    report, out = pruned
    assert report["flops_fraction"] <= 0.5
    assert report["pruned"]["params"] < report["unpruned"]["params"]
    top1 = report["top1"]
    assert top1["unpruned"] >= 95, top1
    # pruning alone loses most of the accuracy; the fine-tuning brings it back to within the gate
    assert top1["before_finetune"] < top1["unpruned"] - 20, top1
    assert top1["pruned"] >= top1["unpruned"] - 1.0, top1
    assert report["gate"] == "pass", top1
    assert report["agreement_with_unpruned"] >= 95
    # the figures are the checkpoints', not the report's own: recount from the files
    ckpt = load_checkpoint(out / "best.pt")
    model = model_from_checkpoint(ckpt)
    flops, params = prune.count_flops_params(model, 32)
    assert (flops, params) == (report["pruned"]["flops"], report["pruned"]["params"])
    assert flops / prune.count_flops_params(model_from_checkpoint(load_checkpoint(digits[1])), 32)[0] <= 0.5
    assert ckpt["distillation"]["teacher_sha256"] == report["source_sha256"]


def test_pruned_checkpoint_is_an_ordinary_checkpoint(digits, pruned, tmp_path):
    data, _ = digits
    _, out = pruned
    ckpt = load_checkpoint(out / "best.pt")
    # the architecture is in the checkpoint: build_model alone rebuilds exactly the pruned widths
    rebuilt = build_model(ckpt["arch"], **ckpt["arch_args"])
    assert rebuilt.load_state_dict(ckpt["model"]) is not None
    nominal = build_model(ckpt["arch"], **{k: v for k, v in ckpt["arch_args"].items() if k != "channels"})
    assert layer_widths(rebuilt) != layer_widths(nominal)
    assert ({k: list(v.shape) for k, v in rebuilt.state_dict().items()}
            == {k: list(v.shape) for k, v in ckpt["model"].items()})
    # export takes it unchanged, validated against PyTorch, and the ONNX is smaller
    export(out / "best.pt", data, tmp_path / "model.onnx")
    sizes = sum(numpy_helper.to_array(t).size for t in onnx.load(tmp_path / "model.onnx").graph.initializer)
    assert sizes < 0.6 * sum(v.numel() for k, v in nominal.state_dict().items() if "num_batches" not in k)


def test_failed_gate_writes_no_pruned_checkpoint(digits, tmp_path):
    data, ckpt = digits
    stale = tmp_path / "best.pt"
    stale.write_bytes(b"an earlier pruning's checkpoint")
    # a tenth of the FLOPs with almost no fine-tuning cannot stay within a point of the original
    with pytest.raises(prune.PruneGateError, match="accuracy gate failed"):
        run_prune(data, ckpt, tmp_path, "--target-flops", "0.1", "--epochs", "1", "--lr", "1e-5")
    assert not stale.exists()
    report = json.loads((tmp_path / prune.REPORT).read_text())
    assert report["gate"] == "fail"
    assert report["flops_fraction"] <= 0.1


def test_unreachable_target_is_refused(digits, tmp_path):
    data, ckpt = digits
    with pytest.raises(ValueError, match="cannot be met"):
        run_prune(data, ckpt, tmp_path, "--target-params", "0.001", "--target-flops", "0")


def test_two_four_sparsity_survives_fine_tuning_and_export(digits, tmp_path):
    data, ckpt = digits
    report = run_prune(data, ckpt, tmp_path, "--sparsity", "2:4", "--epochs", "2", "--max-top1-drop", "100")
    assert report["two_four"]["violations"] == 0
    assert report["round_to"] % 16 == 0
    # what TensorRT will see: the exported ONNX's convolution weights, 2 of every 4 input channels zero
    export(tmp_path / "best.pt", data, tmp_path / "model.onnx")
    model = onnx.load(tmp_path / "model.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = [weights[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    sparse = [w for w in conv if eligible(torch.from_numpy(w))]
    assert len(sparse) >= len(conv) - 1  # all but the stem (3 input channels)
    for w in sparse:
        assert two_four_violations(torch.from_numpy(w)) == 0
        assert np.mean(w == 0) >= 0.5


@pytest.mark.server
def test_served_side_by_side(digits, pruned, tmp_path):
    data, ckpt = digits
    report, out = pruned
    unpruned_onnx = ckpt.parent / "model.onnx"
    export(ckpt, data, unpruned_onnx)
    export(out / "best.pt", data, out / "model.onnx")
    from build.render_repo import render
    from build.settings import RepoSettings

    render(unpruned_onnx, tmp_path / "repo", RepoSettings(max_batch_size=8))
    r = perf_pruned.compare(unpruned_onnx, out, tmp_path / "repo", data / "val", rounds=2, concurrency=4,
                            request_count=60)
    rows = r["served"]["results"]
    assert [(x["round"], x["variant"]) for x in rows if x["source"] == "jpeg"] == \
        [(1, "unpruned"), (1, "pruned"), (2, "pruned"), (2, "unpruned")]
    assert all(x["images_per_s"] > 0 for x in rows)
    ratio = r["artifacts"][out.name]["served_vs_unpruned"]["tensors"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    md = (out / "prune_report.md").read_text()
    assert f"| {out.name} |" in md
    assert "vs unpruned" in md
    # an unpruned ONNX of another checkpoint is refused: the comparison would be meaningless
    other = tmp_path / "other"
    train.main(train.parse_args(["--data", str(data), "--out", str(other), "--quiet", "--epochs", "1",
                                 "--img-size", "32", *FAST]))
    export(other / "best.pt", data, other / "model.onnx")
    with pytest.raises(ValueError, match="not exported from the checkpoint that was pruned"):
        perf_pruned.compare(other / "model.onnx", out, tmp_path / "repo",
                            data / "val", rounds=1, request_count=20)
