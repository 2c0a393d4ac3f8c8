"""Measuring the served model, one package per purpose:

    load/         the load drivers: wrk (wrk.py, post_bodies.lua), perf_analyzer, locust; the request bodies,
                  the alternating rounds and the statistics (the server's own, and a figure's spread)
    reference/    what Triton is measured against: the naive baseline, the in-process ceiling, the peer
                  servers (peers/), and `make compare`, every server side by side under one generator
    ab/           the A/B measurements, one registry run by one entry point: python -m perf.ab WHAT
    tuning/       the batching tuner (tune.py) and Triton Model Analyzer's search (analyze.py)
    report/       the whole report (`make report`) and the workloads on real photographs (workloads.py)
    checks/       end-to-end checks on a real server: reliability, soak, monitoring, the GPU
    experiments/  ML experiments: transfer, real data sets, fidelity to the libraries' transforms
    paths.py      the project root and perf/reports/, where every report goes
"""
