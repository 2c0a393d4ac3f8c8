"""The training package: exact resume after a kill, 2-process DDP, distillation, recipes, config files,
bad images, evaluation reports, and the model family."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from build.export_onnx import export
from core.preprocess import PreprocessSpec
from training import synthetic, train
from training.checkpoint import load_checkpoint
from training.data import EpochSampler, ImageFolderTrain, TrainTransform, drop_bad_images, find_classes, list_images
from training.evaluate import get_args_parser as eval_args
from training.evaluate import main as eval_main
from training.models import build_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("resume") / "d", num_classes=10, train_per_class=40,
                              val_per_class=4, seed=5)


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    # two persistent DataLoader workers: a resumed run must match although each worker holds its own
    # copy of the data set (the epoch travels with the indices, training.data.EpochSampler)
    return [sys.executable, "-m", "training.train", "--data", str(data), "--out", str(out), "--img-size", "48",
            "--epochs", "4", "--batch-size", "32", "--workers", "2", "--quiet", "--model-ema", *extra]


def all_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()}
    flat.update({f"train.{k}": v for k, v in ckpt["train_state"]["model"].items()})
    for _i, (k, st) in enumerate(ckpt["train_state"]["optimizer"]["state"].items()):
        flat.update({f"opt.{k}.{n}": v for n, v in st.items() if isinstance(v, torch.Tensor)})
    return flat


@pytest.fixture(scope="module")
def uninterrupted(resume_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(train_cmd(resume_data, out), check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_and_resumed_run_is_bit_identical(resume_data, uninterrupted, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(resume_data, out), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill as soon as epoch 1 is checkpointed: we are inside epoch 2
        if (out / "last.pt").exists() and load_checkpoint(out / "last.pt")["epoch"] >= 1:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.02)
    time.sleep(0.3)  # past the checkpoint writes, into epoch 2's batches
    proc.send_signal(sig)
    proc.wait(60)
    killed_at = load_checkpoint(out / "last.pt")["epoch"]
    assert 1 <= killed_at < 4, "the run was not interrupted before its end"
    r = subprocess.run(train_cmd(resume_data, out, "--resume", "auto"), env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'last.pt'} at epoch {killed_at}" in r.stdout
    a, b = all_state(uninterrupted / "last.pt"), all_state(out / "last.pt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def epoch_batches(data: Path, workers: int, epochs: int = 2) -> list[torch.Tensor]:
    """The augmented training images of each epoch, in index order, through the real DataLoader."""
    samples = list_images(data / "train", find_classes(data / "train"))[:24]
    dataset = ImageFolderTrain(samples, TrainTransform(PreprocessSpec.for_size(32), color_jitter=0.2), seed=7)
    sampler = EpochSampler(torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(samples), sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        (images, _), = list(loader)
        out.append(images)
    return out


def test_augmentation_changes_every_epoch_with_persistent_workers(tiny_data):
    first, second = epoch_batches(tiny_data, workers=2)
    same = [i for i in range(len(first)) if torch.equal(first[i], second[i])]
    assert not same, f"images {same} got epoch 0's augmentation again in epoch 1"
    # and it is a function of (seed, epoch, index) only: no workers, or a new run, give the same tensors
    for a, b in zip((first, second), epoch_batches(tiny_data, workers=0), strict=True):
        assert torch.equal(a, b)


@pytest.mark.model
def test_early_stopping_and_dropout(tiny_data, tmp_path):
    out = tmp_path / "run"
    # lr 0: val top-1 only drifts (BatchNorm statistics, EMA), so it soon stalls for 2 epochs
    r = subprocess.run(train_cmd(tiny_data, out, "--epochs", "10", "--lr", "0", "--patience", "2", "--dropout", "0.3",
                                 "--workers", "0"), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    top1 = [json.loads(line)["top1"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_epoch = 1 + top1.index(max(top1))  # the first epoch that reached the best
    assert len(top1) == best_epoch + 2 < 10, f"ran {len(top1)} epochs, best at {best_epoch}, patience 2"
    assert f"early stop after epoch {len(top1)}: val top-1 has not improved for 2 epoch(s)" in r.stdout
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["arch_args"]["dropout"] == 0.3
    assert ckpt["best_epoch"] == best_epoch
    model = build_model(ckpt["arch"], **ckpt["arch_args"])
    model.load_state_dict(ckpt["model"])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout is active in training
    model.eval()
    assert torch.equal(model(x), model(x))  # and gone in the served graph


@pytest.mark.model
def test_ddp_two_processes_match_single_process_effective_batch(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--img-size", "32", "--epochs", "2", "--workers", "0", "--quiet",
              "--warmup-epochs", "0", "--lr", "0.05"]
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                        "-m", "training.train", *common, "--batch-size", "16", "--out", str(tmp_path / "ddp")],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2 (gloo), effective batch 32" in r.stdout
    for bs in (32, 16):
        subprocess.run([sys.executable, "-m", "training.train", *common, "--batch-size", str(bs),
                        "--out", str(tmp_path / f"single{bs}")], env=ENV, cwd=ROOT, check=True, capture_output=True,
                       timeout=300)

    def weights(name):
        return load_checkpoint(tmp_path / name / "last.pt")["train_state"]["model"]

    def distance(x, y):
        return sum(float(((x[k].float() - y[k].float()) ** 2).sum()) for k in x if x[k].is_floating_point()) ** 0.5

    ddp, same_batch, half_batch = weights("ddp"), weights("single32"), weights("single16")
    # Same samples and augmentations per step; only BatchNorm statistics differ (per-rank batches of 16),
    # so DDP lands far closer to the single process with the same effective batch.
    assert distance(ddp, same_batch) < 0.5 * distance(ddp, half_batch)
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["provenance"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_collectives_run_on_the_backends_device(monkeypatch):
    """NCCL reduces only CUDA tensors: a CPU tensor made DDP on GPUs fail at the end of the first epoch.
    Where a collective's tensor is made is checked here by recording it (no second GPU to run NCCL on);
    the real gloo run is test_ddp_two_processes_match_single_process_effective_batch, the real NCCL one
    test_ddp_nccl_two_gpus."""
    from training import distributed

    seen = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: seen.append(t.device))
    for device in (torch.device("cpu"), torch.device("meta")):  # meta: any non-CPU device will do
        info = distributed.DistInfo(rank=0, world_size=2, backend="nccl", device=device)
        # meta tensors have no values to copy back; the device is what matters
        with contextlib.suppress(NotImplementedError):
            distributed.all_reduce_sum([1.0, 2.0], info)
    assert seen == [torch.device("cpu"), torch.device("meta")]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two CUDA GPUs (one per process)")
def test_ddp_nccl_two_gpus(tiny_data, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                        "-m", "training.train", "--data", str(tiny_data), "--img-size", "32", "--epochs", "2",
                        "--workers", "0", "--quiet", "--patience", "5", "--out", str(tmp_path / "nccl")],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2 (nccl)" in r.stdout


def test_distilled_student_trains_and_exports(checkpoint, tiny_data, tmp_path):
    out = tmp_path / "student"
    args = train.parse_args(["--data", str(tiny_data), "--out", str(out), "--img-size", "32", "--epochs", "2",
                             "--batch-size", "32", "--workers", "0", "--quiet", "--width", "8",
                             "--teacher", str(checkpoint), "--distill-alpha", "0.7"])
    metrics = train.main(args)
    assert math.isfinite(metrics["train_loss"])
    student = load_checkpoint(out / "best.pt")
    teacher = load_checkpoint(checkpoint)
    assert student["distillation"]["teacher_sha256"]
    assert student["distillation"]["alpha"] == 0.7
    assert sum(v.numel() for v in student["model"].values()) < sum(v.numel() for v in teacher["model"].values()) / 4
    report = export(out / "best.pt", tiny_data, tmp_path / "student.onnx", max_images=16)
    assert report["top1_agreement"] == 1.0


def test_distillation_loss_terms():
    ce = nn.CrossEntropyLoss()
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert torch.allclose(train.distillation_loss(s, t, y, ce, 0.0, 4.0), ce(s, y))
    assert float(train.distillation_loss(t, t, y, ce, 1.0, 4.0)) == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    train.distillation_loss(s, t, y, ce, 1.0, 2.0).backward()
    with torch.no_grad():  # a step along -grad moves the student's softened distribution toward the teacher's
        before = train.distillation_loss(s, t, y, ce, 1.0, 2.0)
        after = train.distillation_loss(s - 0.1 * s.grad, t, y, ce, 1.0, 2.0)
    assert after < before


def test_config_file_and_command_line_override(tmp_path, tiny_data):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"data: {tiny_data}\nopt: adamw\nlr: 0.002\nlabel-smoothing: 0.2\nmodel_ema: true\n")
    args = train.parse_args(["--config", str(cfg), "--lr", "0.003"])
    assert ((args.opt, args.lr, args.label_smoothing, args.model_ema, args.data)
            == ("adamw", 0.003, 0.2, True, tiny_data))
    cfg.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        train.parse_args(["--config", str(cfg), "--data", "x"])
    cfg.write_text("opt: lamb\n")
    with pytest.raises(ValueError, match="opt must be one of"):
        train.parse_args(["--config", str(cfg), "--data", "x"])


def test_recipe_pieces():
    model = build_model("resnet_tiny", num_classes=3)
    decay, no_decay = train.param_groups(model, 1e-4, 0.0)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) > 0
    args = train.parse_args(["--data", "x", "--epochs", "10", "--warmup-epochs", "2"])
    f = [train.lr_factor(s, 5, args) for s in range(50)]
    assert f[0] == pytest.approx(0.1)
    assert f[9] == pytest.approx(1.0)
    assert f[49] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # cosine decays monotonically after warm-up
    args = train.parse_args(["--data", "x", "--lr-scheduler", "step", "--lr-step-size", "3", "--warmup-epochs", "0"])
    assert [train.lr_factor(s * 5, 5, args) for s in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])


def test_unreadable_images_are_named_and_can_be_skipped(tiny_data, tmp_path):
    samples = list_images(tiny_data / "train", find_classes(tiny_data / "train"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(samples[0][0].read_bytes()[:300])
    gif = tmp_path / "anim.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    with pytest.raises(ValueError, match=r"2 unreadable image\(s\)[\s\S]*broken.jpg[\s\S]*anim.png: is GIF"):
        drop_bad_images(samples + [(broken, 0), (gif, 1)], "fail")
    assert drop_bad_images(samples + [(broken, 0), (gif, 1)], "skip") == samples


def test_bad_image_scan_is_cached_by_the_files_listing(tiny_data, tmp_path, monkeypatch):
    from training import data

    monkeypatch.setenv("IMAGE_PLATFORM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    samples = []
    for i, (p, y) in enumerate(list_images(tiny_data / "train", find_classes(tiny_data / "train"))[:4]):
        (folder / f"{i}.jpg").write_bytes(p.read_bytes())
        samples.append((folder / f"{i}.jpg", y))
    assert drop_bad_images(samples, "fail") == samples
    decoded = []
    monkeypatch.setattr(data, "image_problem", lambda p: decoded.append(p))
    assert drop_bad_images(samples, "fail") == samples
    assert decoded == []
    monkeypatch.undo()
    monkeypatch.setenv("IMAGE_PLATFORM_CACHE", str(tmp_path / "cache"))
    samples[1][0].write_bytes(samples[1][0].read_bytes()[:200])  # a file changes: it is scanned again
    with pytest.raises(ValueError, match=r"1 unreadable image\(s\)[\s\S]*1.jpg"):
        drop_bad_images(samples, "fail")


def test_cli_reports_bad_data_without_traceback(tmp_path):
    (tmp_path / "train" / "only").mkdir(parents=True)
    (tmp_path / "val" / "only").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "training.train", "--data", str(tmp_path)], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "has 1 class folder(s); a classifier needs at least 2" in r.stderr


def test_eval_report_with_confusion_matrix(checkpoint, tiny_data, tmp_path):
    report = eval_main(eval_args().parse_args(
        ["--ckpt", str(checkpoint), "--data", str(tiny_data), "--out", str(tmp_path)]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == report["top1"]
    assert set(saved["per_class_top1"]) == set(saved["classes"])
    cm = torch.tensor(saved["confusion_matrix"])
    assert cm.sum() == saved["images"]
    assert float(cm.trace() / cm.sum() * 100) == pytest.approx(saved["top1"])
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "confusion.csv").read_text().splitlines()
    assert [[int(v) for v in r.split(",")[1:]] for r in rows[1:]] == saved["confusion_matrix"]


def test_confusions_stay_readable_with_1000_classes(tmp_path):
    from PIL import Image

    from training.evaluate import plot_confusion, top_confusions

    classes = [f"c{i}" for i in range(1000)]
    cm = np.diag(np.full(1000, 50))
    cm[7, 3], cm[500, 501], cm[999, 0] = 9, 30, 4
    top = top_confusions(cm, classes)
    assert [(t["true"], t["predicted"], t["count"]) for t in top] == [("c500", "c501", 30), ("c7", "c3", 9),
                                                                       ("c999", "c0", 4)]
    plot_confusion(cm, classes, tmp_path / "confusion.png", "1000 classes")
    with Image.open(tmp_path / "confusion.png") as img:
        assert img.width <= 1200
        assert img.height <= 1200


@pytest.mark.parametrize("arch,params", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_resnets_match_the_reference_architectures(arch, params):
    """Parameter counts of torchvision's ResNets at 1000 classes: same layers, same shapes."""
    model = build_model(arch, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_reach_the_trainer(config):
    """Every setting of a shipped recipe arrives in the training arguments, and its model runs at its size."""
    import yaml

    recipe = yaml.safe_load(config.read_text())
    args = vars(train.parse_args(["--config", str(config), "--data", "x"]))
    differ = {k: (v, args[k.replace("-", "_")]) for k, v in recipe.items() if args[k.replace("-", "_")] != v}
    assert not differ, f"recipe value -> parsed value: {differ}"
    model = build_model(args["arch"], num_classes=3, **({"width": args["width"]} if args["width"] else {}))
    assert model.eval()(torch.zeros(1, 3, args["img_size"], args["img_size"])).shape == (1, 3)


def test_top5_is_left_out_below_five_classes():
    from training.evaluate import format_topk, topk_accuracy

    two = topk_accuracy(np.array([[2.0, 1.0], [0.0, 3.0]]), np.array([0, 0]))
    assert format_topk(two) == "top1 50.00"  # was "top1 50.00  top5 nan"
    six = topk_accuracy(np.eye(6), np.arange(6))
    assert format_topk(six, "%") == "top1 100.00%  top5 100.00%"
