"""BentoML peer: the pipeline of pipeline.py behind a BentoML service with adaptive batching.

    .venv-bentoml/bin/python -m perf.reference.peers.bento_service --spec spec.json --port 8700

POST the encoded image as a multipart file field ``images`` to /predict (how a BentoML client sends
files); the answer is a JSON list with one {"labels": [...], "scores": [...]} (or {"error": ...}). The
batchable API lets BentoML's dispatcher merge requests up to the repository's max batch size, in as
many workers as Triton has instances. Runs in its own virtualenv (.venv-bentoml, `make peers`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType

SPEC_ENV = "PEER_SPEC"
SPEC = json.loads(Path(os.environ[SPEC_ENV]).read_text()) if SPEC_ENV in os.environ else None


@bentoml.service(workers=SPEC["instances"] if SPEC else 1, traffic={"timeout": 60})
class Classifier:
    def __init__(self):
        from perf.reference.peers.pipeline import PeerModel

        self.model = PeerModel(Path(os.environ[SPEC_ENV]))

    # BentoML's adaptive batching targets a latency: the time a batch may take, queue wait included
    @bentoml.api(route="/predict", batchable=True, max_batch_size=SPEC["max_batch_size"] if SPEC else 32,
                 max_latency_ms=1000)
    def predict(self, images: list[Annotated[Path, ContentType("image/*")]]) -> list[dict]:
        return self.model.predict([Path(p).read_bytes() for p in images])


def main(a: argparse.Namespace) -> None:
    """Serve with the spec in the environment (the service class reads it when BentoML imports this module)."""
    os.environ[SPEC_ENV] = str(Path(a.spec).resolve())
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    os.execv(str(bentoml_cli), [str(bentoml_cli), "serve", "perf.reference.peers.bento_service:Classifier",
                                "--host", a.host, "--port", str(a.port)])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="BentoML peer (adaptive batching) of the served model")
    p.add_argument("--spec", required=True, help="written by perf.reference.peers.launch")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
