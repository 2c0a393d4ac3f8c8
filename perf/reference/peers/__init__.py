"""Peer servers measured beside Triton by `make compare` / `make report`: Ray Serve and BentoML.

Each serves the same ONNX file with the same preprocessing (pipeline.py) from its own virtualenv
(`make peers`: .venv-ray, .venv-bentoml), because their pins clash with the project's; launch.py
starts and stops them from the project's environment.
"""
