"""What Triton is measured against: the naive baseline server (baseline.py, started by baseline_process.py),
the in-process ceiling (ceiling.py), the peer servers (peers/), issue 12's targets (targets.py) and
`make compare`, every server side by side under one generator (compare.py, compare_report.py)."""
