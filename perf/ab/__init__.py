"""The A/B measurements: two or more variants of the served model or its settings measured side by side, in
alternating rounds, each one a module here and one entry in the registry (registry.py), run by one entry
point: ``python -m perf.ab WHAT [options]`` (``make ab WHAT=...``; ``python -m perf.ab list`` names them).
Most are variants of the repository's settings under wrk (variants.py); precisions and pruned serve other
ONNX files under perf_analyzer."""
