"""What every stage shares: the platform's contract, in one package of its own.

- ``protocol``: the served ensemble's model and tensor names (the wire contract);
- ``metadata``: the versioned artifact metadata every ONNX file carries, provenance, sha256;
- ``preprocess``: the preprocessing spec, the decode policy, the DALI pipeline built from ``dali_graph``;
- ``stages``: the served stages without Triton (image checks, DALI with per-image isolation, ONNX
  Runtime with the serving options, top-k), copied beside the Python-backend models;
- ``runners``: a registry of inference runners (ONNX Runtime, TensorRT, PyTorch) for every measurement;
- ``atomic_io``: writes that leave no half-written or stale artifact.

Every stage imports this package; it imports no stage (tests/test_architecture.py). It stays light:
NumPy at import time, everything heavier (ONNX, DALI, ONNX Runtime, torch) imported where it is used,
so that ``clients/`` installs and imports without torch or DALI.
"""
