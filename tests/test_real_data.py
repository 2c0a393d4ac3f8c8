"""The default recipe on a real data set the project never generated: scikit-learn's handwritten digits,
written as ImageFolder JPEGs, trained with no flags but --data/--out, and scored served by Triton."""

from __future__ import annotations

import pytest

from perf.experiments import real_data

pytestmark = [pytest.mark.model, pytest.mark.server]  # trains and serves its own models


def test_default_recipe_reaches_98_percent_served_on_real_digits(tmp_path):
    r = real_data.run("digits", tmp_path)
    assert r["val_images"] == 359
    assert r["classes"] == 10
    assert r["served_val_top1"] >= 98.0, r
    # the server's answers are the checkpoint's: at most one val image apart
    assert abs(r["served_val_top1"] - r["checkpoint_val_top1"]) <= 100.0 / r["val_images"] + 1e-9, r
