"""Training's progress: a bar per epoch with images/s on a terminal (none with --quiet), and one line per epoch
with the images/s measured, which a pipe receives as each epoch ends and with no bar frames in it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# PYTHONUNBUFFERED left out: a pipe's output is block-buffered unless the code flushes it, as for most users
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(ROOT)}
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) .*\((\d+) img/s\)")
BAR_FRAMES = ("\r", "img_s=", "batch/s", "█")  # what tqdm draws: carriage returns, its rate, its postfix, its bar
TIMEOUT_S = 240
LAST_LINE = b"best val top1"  # main's last words

pytestmark = pytest.mark.model  # each test trains in its own body


def train_cmd(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "--data", str(data), "--out", str(out), "--img-size", "32",
            "--epochs", str(epochs), "--batch-size", "16", "--workers", "0", "--width", "8", *extra]


def images_per_s(output: str, epochs: int) -> list[int]:
    """The images/s of each epoch's line (a terminal's lines also end where the bar's frames do, at "\r")."""
    lines = [m.groups() for line in re.split(r"[\r\n]+", output) if (m := EPOCH_LINE.fullmatch(line.strip()))]
    assert [(int(e), int(n)) for e, n, _ in lines] == [(e, epochs) for e in range(1, epochs + 1)], output
    return [int(rate) for *_, rate in lines]


def run(cmd: list[str], terminal: bool) -> tuple[str, bool]:
    """What ``cmd`` writes to a pipe, or to a terminal (a pseudo-terminal of 120 columns), as its stdout and
    stderr; and whether the first epoch's line came before the run's last line (written at its end: a
    buffered stdout delivers them together, at exit). Killed, with its process group, on any way out."""
    if terminal:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    else:
        leader, follower = os.pipe()
    try:
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                                start_new_session=True)
    finally:
        os.close(follower)
    data, early = b"", None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no end after {TIMEOUT_S} s: {data.decode(errors='replace')}"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # a terminal's EIO: every writer has closed it
                chunk = b""
            if not chunk:
                break
            data += chunk
            if early is None and re.search(rb"(^|[\r\n])epoch 1/\d+  ", data):
                early = LAST_LINE not in data
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(leader)
    output = data.decode(errors="replace")
    assert proc.returncode == 0, output
    return output, bool(early)


def test_each_epoch_line_reaches_a_pipe_as_the_epoch_ends(tiny_data, tmp_path):
    epochs = 3
    output, early = run(train_cmd(tiny_data, tmp_path, epochs), terminal=False)
    assert early, f"the first epoch's line came only when the run ended (buffered, not flushed): {output}"
    assert all(rate > 0 for rate in images_per_s(output, epochs)), output
    assert not [f for f in BAR_FRAMES if f in output], output


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "quiet"])
def test_progress_bar_with_images_per_s_on_a_terminal(tiny_data, tmp_path, quiet):
    output, _ = run(train_cmd(tiny_data, tmp_path, 1, *(["--quiet"] if quiet else [])), terminal=True)
    assert images_per_s(output, 1)[0] > 0, output
    bar = re.search(r"epoch 1/1: .*img_s=(\d+)", output)
    if quiet:
        assert bar is None, output
    else:
        assert bar, f"no progress bar with images/s on a terminal: {output}"
        assert int(bar.group(1)) > 0
