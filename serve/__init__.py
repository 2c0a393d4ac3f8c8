"""Starting and stopping the real tritonserver on a model repository."""

import shutil
import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def die_with_parent() -> list[str]:
    """A command prefix that makes a server we start get SIGTERM when the process that started it dies,
    however it dies (SIGKILL, the OOM killer, a supervisor's short timeout): Linux's PR_SET_PDEATHSIG,
    set by util-linux's setpriv just before it execs the server (the pid stays the server's). Not a
    preexec_fn, which is unsafe in a process with threads. The signal follows the thread that started
    the server: start a server from a thread that lives as long as it (every caller here uses the main
    thread). Without setpriv (not Linux) nothing is added."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGTERM"] if setpriv else []


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) both raise KeyboardInterrupt, so a foreground command stops its
    children on the way out. SIGINT is set explicitly: a shell starting us in the background leaves it ignored."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
