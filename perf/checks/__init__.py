"""End-to-end checks on a real server, each exiting non-zero when one fails: reliability (overload, fuzzing,
shutdown, live updates, killed stubs), soak, monitoring (monitor_check.py) and the GPU (gpu_check.py)."""
