"""Data, training checkpoint contract, ONNX export and repository rendering (no server needed)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import MAX_BATCH
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from build import export_onnx, layouts
from build.model_config import check_ensemble, read_configs
from build.render_repo import render
from build.settings import RepoSettings, read_manifest, rendered_onnx
from core import metadata
from core import protocol as P
from core.preprocess import DaliPreprocessor, PreprocessSpec
from training import synthetic
from training.checkpoint import load_checkpoint, spec_from_checkpoint
from training.data import dataset_fingerprint, find_classes, list_images
from training.evaluate import get_args_parser as eval_args
from training.evaluate import main as eval_main


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


def test_synthetic_is_deterministic_and_varied(tmp_path):
    a = synthetic.generate(tmp_path / "a", num_classes=10, train_per_class=3, val_per_class=2, seed=7)
    b = synthetic.generate(tmp_path / "b", num_classes=10, train_per_class=3, val_per_class=2, seed=7)
    c = synthetic.generate(tmp_path / "c", num_classes=10, train_per_class=3, val_per_class=2, seed=8)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)
    assert len(find_classes(a / "train")) == 10
    assert len(tree_digest(a)) == 50
    sizes = [Image.open(p).size for p in a.rglob("*.jpg")]
    aspects = [w / h for w, h in sizes]
    assert len(set(sizes)) > 10
    assert min(aspects) < 0.9
    assert max(aspects) > 1.1


def test_data_errors_are_clear(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least 2"):
        find_classes(tmp_path / "train")
    (tmp_path / "train" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "dog" / "x.jpg")
    with pytest.raises(ValueError, match=r"train/cat contains no images"):
        list_images(tmp_path / "train", find_classes(tmp_path / "train"))
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        find_classes(tmp_path / "val")


def test_checkpoint_carries_its_metadata(checkpoint, tiny_data):
    ckpt = load_checkpoint(checkpoint)
    assert ckpt["classes"] == find_classes(tiny_data / "train")
    assert ckpt["arch"] == "resnet_tiny"
    assert ckpt["arch_args"] == {"num_classes": 10}
    spec = spec_from_checkpoint(ckpt)
    assert spec.crop_size == 32
    assert spec.resize_size >= 32
    assert spec.resize_policy == "shorter_center_crop"
    assert 0 <= ckpt["metrics"]["top1"] <= 100
    assert "top5" in ckpt["metrics"]
    prov = ckpt["provenance"]
    assert prov["data_sha256"] == dataset_fingerprint(tiny_data)
    assert prov["seed"] == 0
    assert {"torch", "numpy", "nvidia-dali"} <= set(prov["versions"])
    assert ckpt["args"]["epochs"] == 12
    assert ckpt["args"]["batch_size"] == 16


def test_eval_reproduces_the_recorded_metric(checkpoint, tiny_data):
    """`make eval` on the checkpoint's own val split gives the top-1 recorded at training time."""
    metrics = eval_main(eval_args().parse_args(["--ckpt", str(checkpoint), "--data", str(tiny_data)]))
    assert metrics["top1"] == pytest.approx(load_checkpoint(checkpoint)["metrics"]["top1"])


def test_onnx_has_dynamic_batch_and_metadata(onnx_model, checkpoint):
    model = onnx.load(str(onnx_model))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    meta = metadata.read_metadata(model)
    ckpt = load_checkpoint(checkpoint)
    assert list(meta.classes) == ckpt["classes"]
    assert meta.preprocess.to_dict() == ckpt["preprocess"]
    assert meta.source.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_metadata_contract_is_versioned_relative_and_verified(checkpoint, onnx_model, tmp_path):
    meta = metadata.read_metadata(onnx_model)
    assert meta.schema_version == metadata.SCHEMA_VERSION
    assert not Path(meta.source.checkpoint).is_absolute()
    # the artifacts move together (another machine, a container's /workspace): still found and verified
    moved = tmp_path / "elsewhere" / "artifacts"
    moved.mkdir(parents=True)
    shutil.copy(checkpoint, moved / "best.pt")
    model = onnx.load(str(onnx_model))
    meta = replace(meta, source=replace(meta.source, checkpoint="best.pt"))
    onnx.helper.set_model_props(model, {metadata.METADATA_KEY: meta.to_json()})
    onnx.save(model, str(moved / "model.onnx"))
    assert metadata.source_checkpoint(moved / "model.onnx") == moved / "best.pt"
    # a retrained checkpoint in its place is not taken as the reference of the older ONNX
    ckpt = load_checkpoint(moved / "best.pt")
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, moved / "best.pt")
    with pytest.raises(ValueError, match="is not the checkpoint .* was exported from .* export again"):
        metadata.source_checkpoint(moved / "model.onnx")
    # metadata of another schema version, or the unversioned key of old exports, is refused by name
    for props, message in (({metadata.METADATA_KEY: json.dumps({**meta.to_dict(), "schema_version": 99})},
                            "schema version 99"),
                           ({"platform": meta.to_json()}, "unversioned 'platform' metadata")):
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        with pytest.raises(ValueError, match=message):
            metadata.read_metadata(model)


def test_repository_manifest_is_relative_and_verified(onnx_model, tmp_path):
    artifacts = tmp_path / "a" / "artifacts"
    artifacts.mkdir(parents=True)
    shutil.copy(onnx_model, artifacts / "model.onnx")
    render(artifacts / "model.onnx", tmp_path / "a" / "repo", RepoSettings(max_batch_size=4))
    shutil.move(tmp_path / "a", tmp_path / "b")  # the project moves: repository and artifacts together
    assert rendered_onnx(tmp_path / "b" / "repo") == (tmp_path / "b" / "artifacts" / "model.onnx").resolve()
    (tmp_path / "b" / "artifacts" / "model.onnx").write_bytes(b"re-exported since")
    with pytest.raises(ValueError, match="has changed since .* was rendered from it"):
        rendered_onnx(tmp_path / "b" / "repo")


def test_failed_validation_leaves_nothing_behind(checkpoint, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous good model")
    # Fault injection: PyTorch's reference logits shifted, so ONNX Runtime's no longer match.
    real = export_onnx.logits_for_inputs
    monkeypatch.setattr(export_onnx, "logits_for_inputs", lambda m, x: real(m, x) + 0.5)
    with pytest.raises(export_onnx.ValidationError, match=r"max \|logit diff\| 0.5"):
        export_onnx.export(checkpoint, tiny_data, out, max_images=8)
    assert out.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left


def test_rendered_configs_parse_and_wire_up(ensemble_repo, onnx_model):
    repo = ensemble_repo
    configs = read_configs(repo)
    assert set(configs) == {P.ENSEMBLE, P.PREPROCESS, P.CLASSIFIER, P.POSTPROCESS}
    check_ensemble(configs)
    meta = metadata.read_metadata(onnx_model)
    spec = meta.preprocess
    assert list(configs[P.PREPROCESS].output[0].dims) == list(spec.input_shape)
    assert list(configs[P.CLASSIFIER].output[0].dims) == [len(meta.classes)]
    assert all(c.max_batch_size == MAX_BATCH for c in configs.values())
    assert configs[P.PREPROCESS].input[0].allow_ragged_batch
    assert configs[P.CLASSIFIER].dynamic_batching.max_queue_delay_microseconds > 0
    assert (repo / P.POSTPROCESS / "1" / "labels.txt").read_text().splitlines() == list(meta.classes)
    assert (repo / P.CLASSIFIER / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()


def test_fused_model_has_the_ensembles_interface_and_stages(repo, ensemble_repo, onnx_model):
    """The default layout's one model answers to the ensemble's name with the ensemble's tensors, carries
    each stage model's parameters, and runs the very stage files the ensemble's models run."""
    fused, ens = read_configs(repo), read_configs(ensemble_repo)
    assert set(fused) == {P.ENSEMBLE}
    assert fused[P.ENSEMBLE].backend == "python"

    def tensors(ts):
        return [(t.name, t.data_type, list(t.dims)) for t in ts]

    assert tensors(fused[P.ENSEMBLE].input) == tensors(ens[P.ENSEMBLE].input)
    assert tensors(fused[P.ENSEMBLE].output) == tensors(ens[P.ENSEMBLE].output)
    assert fused[P.ENSEMBLE].input[0].allow_ragged_batch
    assert fused[P.ENSEMBLE].HasField("dynamic_batching")
    params = {k: v.string_value for k, v in fused[P.ENSEMBLE].parameters.items()}
    for name in layouts.STAGE_CODE:
        assert {k: v.string_value for k, v in ens[name].parameters.items()}.items() <= params.items(), name
        assert ((repo / P.ENSEMBLE / "1" / "served" / "stages.py").read_bytes()
                == (ensemble_repo / name / "1" / "served" / "stages.py").read_bytes())
    version = repo / P.ENSEMBLE / "1"
    assert (version / "model.onnx").read_bytes() == onnx_model.read_bytes()
    assert (version / "labels.txt").read_text().splitlines() == list(metadata.read_metadata(onnx_model).classes)
    assert (version / "model.dali").is_file()
    assert not (version / ".placeholder").exists()


def test_rerender_switches_layouts_without_leftovers(onnx_model, tmp_path):
    """fused -> ensemble -> fused in one folder: each time exactly the files of a fresh render."""

    def files(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    fresh = {}
    for layout in ("fused", "postprocess"):
        render(onnx_model, tmp_path / f"fresh-{layout}", RepoSettings(), layout=layout)
        fresh[layout] = files(tmp_path / f"fresh-{layout}")
    for layout in ("fused", "postprocess", "fused", "classification", "postprocess"):
        render(onnx_model, tmp_path / "repo", RepoSettings(), layout=layout)
        if layout in fresh:
            assert files(tmp_path / "repo") == fresh[layout], layout


def test_rerender_keeps_the_repository_settings(onnx_model, tmp_path):
    from build import render_repo

    out = tmp_path / "repo"

    def rerender(*flags: str) -> dict:
        render_repo.main(render_repo.get_args_parser().parse_args(
            ["--onnx", str(onnx_model), "--out", str(out), *flags]))
        return read_configs(out)

    rerender("--max-batch-size", "8", "--queue-delay-us", "500", "--preferred-batch-sizes", "2", "4",  # e.g. tuned
             "--layout", "postprocess")
    configs = rerender("--top-k", "2")  # a later re-render changes one thing and keeps the rest, layout included
    cls = configs[P.CLASSIFIER]
    assert cls.max_batch_size == 8
    assert cls.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(cls.dynamic_batching.preferred_batch_size) == [2, 4]
    assert configs[P.POSTPROCESS].parameters["top_k"].string_value == "2"
    configs = rerender("--reset-settings")  # the defaults, the default layout's included
    assert set(configs) == {P.ENSEMBLE}
    assert read_manifest(out)["layout"] == "fused"
    model = configs[P.ENSEMBLE]
    assert model.max_batch_size == RepoSettings().max_batch_size
    assert model.dynamic_batching.max_queue_delay_microseconds == RepoSettings().queue_delay_us


FP32, FP64 = mc.TYPE_FP32, mc.TYPE_FP64


@pytest.mark.parametrize("breakage,message", [
    ("dims", f"ensemble step 1 (classifier): 'pixels' is ({FP32}, [3, 32, 32]) "
             f"but input 'PIXELS' expects ({FP32}, [3, 31, 32])"),
    ("dtype", f"ensemble step 2 (postprocess): 'logits' is ({FP32}, [10]) but input 'LOGITS' expects ({FP64}, [10])"),
    ("unknown_tensor", "ensemble step 1 (classifier): input 'PIXELS' reads 'pixelz', which no earlier step produces"),
    ("missing_model", "ensemble step 1 (classifier): no config for model 'classifier'")])
def test_wiring_check_catches_mistakes(breakage, message):
    configs = layouts.postprocess_configs(
        layouts.ConfigInputs(PreprocessSpec.for_size(32), 10, RepoSettings(), "embedded",
                             metadata.ExportInfo(opset=18, input="input", output="logits", precision="fp32",
                                                 versions={})))
    check_ensemble(configs)
    if breakage == "dims":
        configs[P.CLASSIFIER].input[0].dims[1] = 31
    elif breakage == "dtype":
        configs[P.POSTPROCESS].input[0].data_type = mc.TYPE_FP64
    elif breakage == "unknown_tensor":
        configs[P.ENSEMBLE].ensemble_scheduling.step[1].input_map[P.PIXELS] = "pixelz"
    else:
        del configs[P.CLASSIFIER]
    with pytest.raises(ValueError, match=re.escape(message)):
        check_ensemble(configs)


def test_serialized_dali_pipeline_equals_eval_transform(repo, onnx_model, val_files):
    """The pipeline Triton runs gives bit-identical inputs to the one training evaluated with."""
    from nvidia.dali import Pipeline

    spec = metadata.read_metadata(onnx_model).preprocess
    served = repo / layouts.get(read_manifest(repo)["layout"]).pipeline_model / "1" / "model.dali"
    pipe = Pipeline.deserialize(serialized_pipeline=served.read_bytes(),
                                batch_size=MAX_BATCH, num_threads=1, device_id=None, prefetch_queue_depth=1,
                                exec_async=False, exec_pipelined=False)
    pipe.build()
    files = val_files[:MAX_BATCH]
    pipe.feed_input(P.IMAGE, [np.fromfile(f, np.uint8) for f in files])
    (served,) = pipe.run()
    np.testing.assert_array_equal(served.as_array(), DaliPreprocessor(spec).files(files))


def test_preprocess_spec_validation():
    with pytest.raises(ValueError, match="resize_policy"):
        PreprocessSpec(crop_size=32, resize_size=36, resize_policy="squash")
    with pytest.raises(ValueError, match="crop_size <= resize_size"):
        PreprocessSpec(crop_size=64, resize_size=32)
    spec = PreprocessSpec.for_size(224)
    assert spec.resize_size == 256
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
