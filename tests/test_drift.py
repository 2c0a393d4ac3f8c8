"""The drift score's parts without a server: the stratified reference sample, the smoothed PSI, the class bins
for many-class models, and the window every instance of a served model version shares."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from served import stages
from served.stages import DRIFT_ALERT_PSI, DriftWindow, SharedDriftWindow, class_bins, psi
from training.data import stratified


def test_every_prefix_of_the_stratified_order_holds_each_class_in_proportion():
    sizes = {0: 400, 1: 400, 2: 100, 3: 40, 4: 10}
    samples = [(Path(f"{c}/{i}.jpg"), c) for c, n in sizes.items() for i in range(n)]  # folder order
    assert {y for _, y in samples[:256]} == {0}  # what the first images in folder order held
    total = sum(sizes.values())
    for n in (10, 100, 256, 800):
        counts = np.bincount([y for _, y in stratified(samples, n)], minlength=len(sizes))
        assert counts.sum() == n
        expected = np.array(list(sizes.values())) * n / total
        assert np.abs(counts - expected).max() <= 1, (n, counts, expected)
    assert sorted(stratified(samples)) == sorted(samples)  # all of them, each once
    assert stratified(samples, 50) == stratified(samples, 50)


def reference_of(classes: np.ndarray, num_classes: int, confidence_bin: int = 9) -> dict:
    n = len(classes)
    conf = np.zeros(len(stages.CONFIDENCE_BUCKETS) + 1)
    conf[confidence_bin] = 1.0
    return {"answers": n, "confidence": conf.tolist(), "classes": (np.bincount(classes, minlength=num_classes) / n)
            .tolist()}


def window_score(reference: dict, classes: np.ndarray, size: int, confidence_bin: int = 9) -> dict[str, float]:
    w = DriftWindow(reference, size)
    top1 = np.full(len(classes), stages.CONFIDENCE_BUCKETS[confidence_bin] - 0.01)
    w.add(top1, classes)
    scores = w.scores()
    assert scores is not None
    return scores


def test_in_distribution_windows_stay_well_under_the_threshold_at_ten_and_a_thousand_classes():
    """The default window (500) against a 2,000-answer reference drawn from the same class mix: under 0.1,
    also for a 1,000-class model, whose classes would otherwise be 1,000 mostly empty bins."""
    rng = np.random.default_rng(0)
    for num_classes in (10, 1000):
        mix = rng.dirichlet(np.full(num_classes, 5.0))
        reference = reference_of(rng.choice(num_classes, 2000, p=mix), num_classes)
        worst = max(window_score(reference, rng.choice(num_classes, 500, p=mix), 500)["class_mix"]
                    for _ in range(20))
        assert worst < 0.1, (num_classes, worst)


def test_a_real_shift_crosses_the_threshold():
    reference = reference_of(np.arange(2000) % 10, 10)
    assert window_score(reference, np.zeros(500, np.int64), 500)["class_mix"] > DRIFT_ALERT_PSI  # one class only
    assert window_score(reference, np.arange(500) % 5, 500)["class_mix"] > DRIFT_ALERT_PSI  # half the classes


def test_a_class_a_small_reference_missed_weighs_what_the_counts_say():
    """A 50-answer reference that happened to hold no answer of one class, then traffic with every class
    alike: weak evidence of a shift, scored under the threshold (a fixed floor of 1e-3 scored it 0.46)."""
    reference = reference_of(np.arange(50) % 9, 10)
    live = np.arange(500) % 10
    assert window_score(reference, live, 500)["class_mix"] < DRIFT_ALERT_PSI


def test_psi_smoothing_follows_the_sizes():
    ref, live = [0.5, 0.5, 0.0], [0.4, 0.4, 0.2]
    small, large = psi(ref, live, 100, 100), psi(ref, live, 10_000, 10_000)
    assert 0 < small < large  # fewer answers: a half answer is a larger share of the empty bin
    assert psi(ref, ref, 100, 100) == pytest.approx(0.0)


def test_class_bins_group_many_classes_into_contiguous_ranges():
    bins = class_bins(1000)
    assert np.bincount(bins).tolist() == [50] * stages.MAX_CLASS_BINS
    assert np.all(np.diff(bins) >= 0)
    assert np.array_equal(class_bins(12), np.arange(12))  # few classes: each its own bin


def add_answers(folder: str, reference: dict, size: int, classes: list[int], ready, go) -> None:
    window = SharedDriftWindow(reference, size, folder, "classify-v1")
    ready.set()
    go.wait(30)
    for c in classes:
        window.add(np.array([0.85]), np.array([c]))
    window.close()


def test_the_instances_of_a_model_version_share_one_window(tmp_path):
    """Three processes (a model's instances) answer a third of a window each: one window is full, scored
    by every instance alike, and the file is gone once the last one closes."""
    reference = reference_of(np.arange(10).repeat(50), 10, confidence_bin=8)
    size = 300
    ctx = multiprocessing.get_context("spawn")
    ready, go = [ctx.Event() for _ in range(3)], ctx.Event()
    # the instances are the server's children: so is this test's window, opened by the parent's children
    procs = [ctx.Process(target=add_answers, args=(str(tmp_path), reference, size, list(range(10)) * 10, r, go))
             for r in ready]
    for p in procs:
        p.start()
    try:
        for r in ready:
            assert r.wait(60)
        rings = list(tmp_path.glob("classify-v1.*.ring"))
        assert len(rings) == 1, rings  # one file for the three instances
        go.set()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            p.kill()
    assert not list(tmp_path.glob("*.ring"))  # the last one to close removed it


def test_a_shared_window_scores_after_its_size_in_all(tmp_path):
    reference = reference_of(np.arange(10).repeat(50), 10, confidence_bin=8)
    instances = [SharedDriftWindow(reference, 90, tmp_path, "classify-v1") for _ in range(3)]
    try:
        for w in instances:
            assert w.scores() is None  # under 90 answers in all, no instance has a score
            w.add(np.full(30, 0.85), np.arange(30) % 10)
        scores = [w.scores() for w in instances]
        assert scores[0] is not None
        assert scores[0] == scores[1] == scores[2]
        assert max(scores[0].values()) < 0.1
        other = SharedDriftWindow(reference, 90, tmp_path, "classify-v2")  # another version: its own window
        assert other.scores() is None
        other.close()
    finally:
        for w in instances:
            w.close()
    assert not list(tmp_path.glob("*.ring"))


def test_a_window_left_by_a_server_that_is_gone_is_removed(tmp_path):
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join(30)
    orphan = tmp_path / f"classify-v1.{dead.pid}.ring"
    orphan.write_bytes(b"\0" * 64)
    w = SharedDriftWindow(reference_of(np.arange(10), 10), 10, tmp_path, "classify-v1")
    w.close()
    assert not orphan.exists()


def test_make_repo_warns_when_the_reference_misses_a_class(capsys):
    from build.render_repo import warn_about_the_drift_reference
    from build.settings import RepoSettings

    classes = ["cat", "dog", "fox"]
    reference = {"split": "val", "answers": 40, "classes": [0.5, 0.5, 0.0], "confidence": [1.0]}
    warn_about_the_drift_reference(reference, classes, RepoSettings())
    out = capsys.readouterr().out
    assert "no answer of 1 of 3 classes (fox)" in out
    warn_about_the_drift_reference({**reference, "classes": [0.4, 0.4, 0.2]}, classes, RepoSettings())
    assert capsys.readouterr().out == ""
    warn_about_the_drift_reference(None, classes, RepoSettings())
    assert "has no drift reference" in capsys.readouterr().out
    warn_about_the_drift_reference(reference, classes, RepoSettings(drift_window=0))  # drift off: nothing to say
    assert capsys.readouterr().out == ""
