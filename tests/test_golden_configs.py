"""Golden rendered configs: the config.pbtxt files `make repo` writes for every layout x target, committed
under tests/golden/<layout>-<target>/ so that a reader can open what Triton is told without rendering, and
diffed here so that any change to what is served shows up as a diff to review.

They are rendered from the session's tiny model (10 classes, 32 px) with the default settings; the values
that depend on the trained weights (the served file's sha256, the drift reference: the model's answers on
its val split) are written as <depends on the trained weights>.
After an intended change: ``UPDATE_GOLDEN=1 pytest tests/test_golden_configs.py``, then read ``git diff``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from build import layouts
from build.render_repo import render
from build.settings import RepoSettings

GOLDEN = Path(__file__).resolve().parent / "golden"
COMBOS = sorted((name, target) for name, lay in layouts.LAYOUTS.items() for target in lay.targets)
WEIGHT_DEPENDENT = ("onnx_sha256", "drift_reference")
KEYS = "|".join(WEIGHT_DEPENDENT)
PARAMETER_VALUE = re.compile(rf'(key: "(?:{KEYS})"\s*value \{{\s*string_value: ")(?:[^"\\]|\\.)*"')


def masked(config: str) -> str:
    return PARAMETER_VALUE.sub(r'\1<depends on the trained weights>"', config)


def rendered_configs(onnx_model: Path, out: Path, layout: str, target: str) -> dict[str, str]:
    render(onnx_model, out, RepoSettings(), target=target, layout=layout)
    return {str(p.relative_to(out)): masked(p.read_text()) for p in sorted(out.glob("*/config.pbtxt"))}


@pytest.mark.parametrize(("layout", "target"), COMBOS, ids=[f"{lay}-{t}" for lay, t in COMBOS])
def test_rendered_configs_equal_the_golden_ones(onnx_model, tmp_path, layout, target):
    got = rendered_configs(onnx_model, tmp_path / "repo", layout, target)
    golden = GOLDEN / f"{layout}-{target}"
    if os.environ.get("UPDATE_GOLDEN"):
        for stale in golden.glob("*/config.pbtxt"):
            stale.unlink()
        for rel, text in got.items():
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_text(text)
    expected = {str(p.relative_to(golden)): p.read_text() for p in sorted(golden.glob("*/config.pbtxt"))}
    assert sorted(got) == sorted(expected), f"models rendered for {layout}-{target} differ from {golden}"
    for rel, text in got.items():
        assert text == expected[rel], f"{rel} differs from {golden / rel} (UPDATE_GOLDEN=1 after an intended change)"


def test_every_golden_folder_is_a_layout_and_target():
    """A layout removed or renamed leaves no golden config behind that no test reads."""
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(f"{lay}-{t}" for lay, t in COMBOS)
