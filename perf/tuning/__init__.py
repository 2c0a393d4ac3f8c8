"""The tuners that write their winner back into the repository: the batching sweep (tune.py, `make tune`)
and Triton Model Analyzer's search (analyze.py, `make analyze`)."""
