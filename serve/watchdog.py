"""Bring back a Python-backend model whose stub process died.

Triton 2.51's Python backend (r24.10) neither notices nor restarts a stub that died (the OOM killer, a
crash in a native library, a stray ``kill``): it leaves the process a zombie, keeps reporting the model
READY, and answers every request that reaches that instance with 500 "Stub process '<instance>' is not
healthy" until the server restarts. (The restart qa/L0_backend_python once tested was taken out before
r24.10; later releases report the instance not ready, but do not restart it either.)

:class:`StubWatchdog` polls the server's children from its start, learning each stub's model as the models
load. A stub seen as a zombie on two polls in a row (Triton reaps the stubs it stops itself at once) is
mapped to its model by the ``model.py`` path it was started
with, and ``reload(model)`` is called: with explicit model control that is ``AdminClient.reload``, which
swaps in new instances while the healthy ones keep serving. Without a way to reload, the death is reported.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

POLL_S = 0.5


@dataclass
class StubExit:
    model: str | None      # None: the stub died before the watchdog saw it alive
    pid: int
    how: str               # "killed by signal 9", "exit status 1"
    detected: float        # time.monotonic()
    reloaded: float | None = None
    error: str = ""


def children(pid: int) -> set[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    out: set[int] = set()
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out.update(int(p) for p in f.read_text().split())
    return out


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (the command name may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def stub_model(pid: int) -> str | None:
    """The model a Python-backend stub serves, from its command line (python_backend r24.10,
    stub_launcher.cc): ``stub <model dir>/<version>/model.py <shm region> <sizes> <parent pid> <lib dir>
    <ipc handle> <instance name> <model dir>``. The instance name is Triton's default
    <model>_<group>_<index>; the model folder's name is the fallback (a repository in an object store
    is downloaded to a temporary folder, whose name says nothing)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if len(args) > 2 and args[0].endswith("bash") and "triton_python_backend_stub" in args[2]:
        # launched as `bash -c "... exec <stub> <args>"`, and not yet exec'ed
        words = args[2].split()
        args = words[next(i for i, w in enumerate(words) if w.endswith("triton_python_backend_stub")):]
    if len(args) < 2 or not args[0].endswith("triton_python_backend_stub"):
        return None
    if len(args) > 8 and (m := re.fullmatch(r"(.+)_\d+_\d+", args[8])):
        return m.group(1)
    return Path(args[1]).parent.parent.name


def exit_description(stat: list[str]) -> str:
    """How a zombie ended, from its exit_code field (the last one of /proc/<pid>/stat, Linux >= 3.5)."""
    code = int(stat[-1]) if len(stat) >= 50 else None
    if code is None:
        return "exited"
    return f"killed by signal {code & 0x7F}" if code & 0x7F else f"exit status {code >> 8}"


@dataclass
class StubWatchdog:
    server_pid: int
    reload: Callable[[str], None] | None   # None: the deaths are only reported
    report: Callable[[str], None] = print
    poll_s: float = POLL_S
    armed: bool = True  # False while the server loads its models: stubs are learnt, deaths wait for arm()
    exits: list[StubExit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._models: dict[int, str] = {}   # live stub pid -> model
        self._suspects: set[int] = set()    # zombies seen once
        self._handled: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[StubExit]:
        """One look at the children; the stub deaths this poll confirmed (and handled)."""
        found, zombies = [], set()
        for pid in children(self.server_pid):
            stat = _stat(pid)
            if stat is None:
                continue
            if stat[0] != "Z":
                if pid not in self._models and (model := stub_model(pid)):
                    self._models[pid] = model
                continue
            zombies.add(pid)
            if self.armed and pid in self._suspects and pid not in self._handled:
                self._handled.add(pid)
                found.append(StubExit(self._models.get(pid), pid, exit_description(stat), time.monotonic()))
        self._suspects = zombies
        for e in found:
            self._handle(e)
        return found

    def _handle(self, e: StubExit) -> None:
        self.exits.append(e)
        what = f"model '{e.model}'" if e.model else "an unknown model"
        if self.reload is None or e.model is None:
            self.report(f"watchdog: the Python stub of {what} (pid {e.pid}) {e.how}; its requests fail until the "
                        "server restarts (serve with explicit model control to have it reloaded)")
            return
        self.report(f"watchdog: the Python stub of {what} (pid {e.pid}) {e.how}; reloading the model")
        try:
            self.reload(e.model)
            e.reloaded = time.monotonic()
            self.report(f"watchdog: model '{e.model}' reloaded in {e.reloaded - e.detected:.1f} s")
        except Exception as err:  # reported, and the next death is handled all the same
            e.error = str(err)
            self.report(f"watchdog: reloading model '{e.model}' failed: {err}")

    def arm(self) -> None:
        """The server is ready: from now on a dead stub's model is reloaded."""
        self.armed = True
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def start(self) -> StubWatchdog:
        """Start polling; started with the server, it learns each stub while the models load."""
        self.poll()
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
