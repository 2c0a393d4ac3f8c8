"""A build step that is killed or fails half-way (a full disk) leaves the previous artifacts intact.

The steps run as real subprocesses. "Killed" is made deterministic with an audit hook (sys.addaudithook)
that SIGKILLs the process at its k-th file-system change (a file opened for writing, a rename, a removal),
so the kill lands at chosen points all through the step; "disk full" is RLIMIT_FSIZE, which makes a
write past the limit fail with EFBIG as a full disk fails it with ENOSPC.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from build.render_repo import render
from build.settings import RepoSettings
from serve.server import PROJECT_ROOT

# Runs a module like `python -m`, counting file-system changes; at the KILL_AT-th one it kills itself.
HOOK = """
import os, runpy, signal, sys
kill_at, seen = int(os.environ.get("KILL_AT", "0")), [0]
def hook(event, args):
    changes = (event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree")
               or (event == "open" and args[1] is not None and any(c in str(args[1]) for c in "wax+"))
               or (event == "open" and args[1] is None and isinstance(args[2], int)
                   and args[2] & (os.O_WRONLY | os.O_RDWR)))
    if changes:
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write(f"\\nfile-system changes: {seen[0]}\\n")
"""


def run_step(args: list[str], kill_at: int = 0, fsize_limit: int | None = None) -> subprocess.CompletedProcess:
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))) if fsize_limit else None
    return subprocess.run([sys.executable, "-c", HOOK, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": str(PROJECT_ROOT)},
                          preexec_fn=preexec)


def changes(r: subprocess.CompletedProcess) -> int:
    return int(r.stderr.rsplit("file-system changes:", 1)[1].split()[0])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) -> sha256 of its content."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# DALI serializes a pipeline with a fresh random seed: the same render gives other bytes each time
UNSTABLE = ("preprocess/1/model.dali", "classify/1/model.dali")


def is_render(now: dict[str, str], new: dict[str, str], old: dict[str, str]) -> bool:
    """``now`` is the render ``new`` was taken from: the same files, byte for byte, but those in UNSTABLE,
    which must be there and differ from ``old``'s."""

    def stable(snap):
        return {f: h for f, h in snap.items() if f not in UNSTABLE}

    return (stable(now) == stable(new) and set(now) == set(new)
            and all(now[f] != old.get(f) for f in UNSTABLE if f in new))


def leftovers(parent: Path) -> list[str]:
    return sorted(str(p.relative_to(parent)) for p in Path(parent).rglob(".*")
                  if ".staging-" in p.name or p.name.endswith(".tmp"))


def test_render_killed_at_any_point_leaves_the_old_repository_or_the_new_one(onnx_model, tmp_path):
    repo, ref = tmp_path / "repo", tmp_path / "ref"
    render(onnx_model, repo, RepoSettings(max_batch_size=8, top_k=3))
    old = snapshot(repo)
    shutil.copytree(repo, ref)
    args = ["build.render_repo", "--onnx", str(onnx_model), "--max-batch-size", "4", "--top-k", "2"]
    done = run_step([*args, "--out", str(ref)])
    assert done.returncode == 0, done.stderr
    new, total = snapshot(ref), changes(done)
    assert not is_render(old, new, old)
    assert total > 10
    seen = []
    # 12 points from the first change to the last
    for k in sorted({round(1 + i * (total - 1) / 11) for i in range(12)}):
        r = run_step([*args, "--out", str(repo)], kill_at=k)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        now = snapshot(repo)
        is_old, is_new = now == old, is_render(now, new, old)
        assert is_old or is_new, f"killed at change {k} of {total}: a mix of two renders"
        seen.append("old" if is_old else "new")
        # the next point starts from the same state: the old repository, nothing left behind (else the
        # next run's clean-up of it would shift where the k-th change falls)
        for p in tmp_path.glob(".repo.staging-*"):
            shutil.rmtree(p)
        if is_new:
            shutil.rmtree(repo)
            render(onnx_model, repo, RepoSettings(max_batch_size=8, top_k=3))
    assert "old" in seen
    assert "new" in seen
    # a run killed at the very end leaves its old copy behind; the next run clears it
    assert run_step([*args, "--out", str(repo)], kill_at=total).returncode == -signal.SIGKILL
    assert leftovers(tmp_path)
    assert run_step([*args, "--out", str(repo)]).returncode == 0
    assert is_render(snapshot(repo), new, old)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("step", ["export", "render"])
def test_build_step_on_a_full_disk_fails_clearly_and_keeps_the_previous_artifact(step, checkpoint, tiny_data,
                                                                                 onnx_model, tmp_path):
    if step == "export":
        out = tmp_path / "model.onnx"
        shutil.copyfile(onnx_model, out)
        args = ["build.export_onnx", "--ckpt", str(checkpoint), "--data", str(tiny_data), "--out", str(out)]
        watched = tmp_path
    else:
        out = tmp_path / "repo"
        render(onnx_model, out, RepoSettings(max_batch_size=8, top_k=3))
        args = ["build.render_repo", "--onnx", str(onnx_model), "--out", str(out), "--max-batch-size", "4"]
        watched = out
    before = snapshot(watched)
    # small files (configs, labels) fit; the model (tens of KiB) does not
    r = run_step(args, fsize_limit=16 * 1024)
    assert r.returncode not in (0, -signal.SIGKILL), r.stderr[-2000:]
    assert "File too large" in r.stderr, r.stderr[-2000:]
    assert snapshot(watched) == before
    assert leftovers(tmp_path) == []
