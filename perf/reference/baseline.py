"""The naive baseline from the seed documents: Flask + PyTorch eager + Pillow, one image per request.

Serves the same checkpoint as Triton does, so the load tools can measure both on the same JPEGs.

    python -m perf.reference.baseline --ckpt artifacts/best.pt --port 8080
    curl --data-binary @cat.jpg localhost:8080/predict
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from core.preprocess import pillow_preprocess
from training.checkpoint import load_checkpoint, model_from_checkpoint, spec_from_checkpoint


def create_app(ckpt_path: str, top_k: int = 5):
    from flask import Flask, jsonify, request

    ckpt = load_checkpoint(ckpt_path)
    model, spec, classes = model_from_checkpoint(ckpt), spec_from_checkpoint(ckpt), ckpt["classes"]
    k = min(top_k, len(classes))
    app = Flask("baseline")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict():
        try:
            x = pillow_preprocess(request.get_data(), spec)
        except Exception as e:  # Pillow raises many types for bad bytes
            return jsonify(error=f"cannot decode image: {e}"), 400
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(x[None])), 1)[0].numpy()
        top = np.argsort(-probs)[:k]
        return jsonify(labels=[classes[i] for i in top], scores=[float(probs[i]) for i in top])

    return app


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Naive Flask + PyTorch baseline server")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    # Flask's own threaded server: the "naive way" this project is measured against
    create_app(a.ckpt).run(host=a.host, port=a.port, threaded=True)
