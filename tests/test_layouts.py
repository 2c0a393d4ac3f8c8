"""The served layouts are a registry: every consumer asks it, so a new layout is one entry."""

from __future__ import annotations

from dataclasses import replace

import pytest

from build import layouts
from build.model_config import read_configs
from build.render_repo import labels_file, render
from build.settings import RepoSettings, read_manifest
from perf.report.analysis import computing_models
from perf.tuning import tune
from serve.publish import onnx_model_dir


def test_a_new_layout_is_one_registry_entry(onnx_model, tmp_path, monkeypatch):
    """A layout added to the registry alone is rendered, and publishing, the tuner and the report find its
    models where it says they are."""
    base = layouts.LAYOUTS["postprocess"]
    monkeypatch.setitem(layouts.LAYOUTS, "mirror", replace(base, name="mirror"))
    repo = tmp_path / "repo"
    render(onnx_model, repo, RepoSettings(max_batch_size=8), layout="mirror")
    manifest = read_manifest(repo)
    assert manifest["layout"] == "mirror"
    assert set(read_configs(repo)) == {*base.python_models(), "classify"}
    assert labels_file(repo) == repo / base.labels_dir / layouts.LABELS_FILE
    assert labels_file(repo).is_file()
    assert onnx_model_dir(repo) == repo / base.onnx_model
    assert (repo / base.onnx_model / "1" / "model.onnx").is_file()
    assert computing_models({"manifest": manifest}) == base.python_models()
    assert tune.default_grid("mirror") == tune.DEFAULT_GRID
    assert tune.default_grid("fused") != tune.DEFAULT_GRID  # a single-model layout varies its one model only


@pytest.mark.parametrize("name", sorted(layouts.LAYOUTS))
def test_every_layout_renders_the_files_its_entry_names(onnx_model, tmp_path, name):
    lay = layouts.LAYOUTS[name]
    render(onnx_model, tmp_path, RepoSettings(max_batch_size=8), layout=name)
    for model in lay.python_models():
        version = tmp_path / model / "1"
        assert (version / "model.py").is_file(), model
        assert (version / "served" / "stages.py").is_file(), model
    assert (tmp_path / lay.pipeline_model / "1" / "model.dali").is_file()
    assert (tmp_path / lay.onnx_model / "1" / "model.onnx").is_file()


def test_a_layout_refuses_a_target_it_does_not_serve(onnx_model, tmp_path):
    with pytest.raises(ValueError, match="the fused layout is for the embedded target only, not gpu"):
        render(onnx_model, tmp_path, RepoSettings(), target="gpu", layout="fused")
    with pytest.raises(ValueError, match="layout must be one of"):
        render(onnx_model, tmp_path, RepoSettings(), layout="sideways")
