"""Starting and stopping the real tritonserver on a model repository."""

import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) both raise KeyboardInterrupt, so a foreground command stops its
    children on the way out. SIGINT is set explicitly: a shell starting us in the background leaves it ignored."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
