"""Ray Serve peer: the pipeline of pipeline.py behind a Ray Serve deployment with @serve.batch.

    .venv-ray/bin/python -m perf.reference.peers.ray_serve --spec spec.json --port 8600

POST the encoded image as the body to /predict; the answer is JSON {"labels": [...], "scores": [...]}
(400 with {"error": ...} for an image that does not decode). Requests are batched by @serve.batch up to
the repository's max batch size, waiting at most its queue delay, in as many replicas as Triton has
instances. Runs in its own virtualenv (.venv-ray, `make peers`); prints READY once it answers.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment
class Classifier:
    def __init__(self, spec_file: str, max_batch: int, wait_s: float):
        from perf.reference.peers.pipeline import PeerModel

        self.model = PeerModel(Path(spec_file))
        self.classify.set_max_batch_size(max_batch)
        self.classify.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0002)
    async def classify(self, images: list[bytes]) -> list[dict]:
        return self.model.predict(images)

    async def __call__(self, request: Request) -> JSONResponse:
        answer = await self.classify(await request.body())
        return JSONResponse(answer, status_code=400 if "error" in answer else 200)


def main(a: argparse.Namespace) -> None:
    import ray

    spec = json.loads(Path(a.spec).read_text())
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": a.host, "port": a.port}, logging_config={"log_level": "WARNING"})
        app = Classifier.options(  # type: ignore[attr-defined]  # @serve.deployment's class gains .optionsnum_replicas=spec["instances"], max_ongoing_requests=2 * spec["max_batch_size"],
                                 ray_actor_options={"num_cpus": 0}).bind(a.spec, spec["max_batch_size"],
                                                                         spec["queue_delay_us"] / 1e6)
        serve.run(app, route_prefix="/predict")
        print("READY", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Ray Serve peer (serve.batch) of the served model")
    p.add_argument("--spec", required=True, help="written by perf.reference.peers.launch")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--cpus", type=int, default=2, help="CPUs Ray schedules on (the replicas ask for none)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
