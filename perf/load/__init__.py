"""The load drivers and what they share: wrk (wrk.py, its script post_bodies.lua), perf_analyzer
(perf_analyzer.py), locust (loadtest.py, locustfile.py); the JPEGs and each server's request body
(bodies.py); every target measured in alternating rounds (rounds.py); the statistics (stats.py)."""
