"""The A/B harness most measurements share: the repository's model served once per variant of its settings
(all at once, each in a throw-away folder), measured side by side by wrk in alternating rounds
(perf/load/rounds.py), and the command line such a measurement takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from core import protocol as P
from perf.load.bodies import sample_images
from perf.load.rounds import compare
from perf.load.wrk import Target
from perf.reference.compare_report import render_markdown

Variant = tuple[str, dict, dict]  # a server of variants(): its name, the settings it changes, TritonServer options


@contextlib.contextmanager
def variant_servers(repo: Path, out: Path, servers: Sequence[Variant]) -> Iterator[tuple[list[Target], dict]]:
    """The repository's model, layout and settings served once per ``(name, settings changed, server options)``,
    all at once, each in a throw-away folder: (their wrk targets, the running servers by name)."""
    from build.artifacts import rendered_candidate
    from build.render_repo import render
    from build.settings import read_manifest, rendered_onnx, settings_from_manifest
    from serve.server import TritonServer

    manifest = read_manifest(repo)
    onnx, settings = rendered_onnx(repo), settings_from_manifest(manifest)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        targets, running = [], {}
        for i, (name, changes, options) in enumerate(servers):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="variant-")))
            # on the engine and precision the repository serves (OpenVINO's, say), not the file's default
            render(onnx, tmp, replace(settings, **changes), layout=manifest["layout"],
                   served=rendered_candidate(manifest, onnx))
            running[name] = stack.enter_context(TritonServer(tmp, None, log_file=out / f"tritonserver-{i}.log",
                                                             **options))
            targets.append(Target(name, f"http://{running[name].http_url}", f"/v2/models/{P.ENSEMBLE}/infer",
                                  "kserve"))
        yield targets, running


def variants(repo: Path, image_dir: Path, out: Path, servers: Sequence[Variant], rounds: int = 3,
             seconds: int = 10, connections: int = 16,
             after: Callable[[dict], dict] | None = None) -> dict:
    """The servers of :func:`variant_servers`, measured by :func:`compare` (the first against each other);
    ``after``: given the running servers by name, its result is added to the report (e.g. what each server
    counted)."""
    from build.settings import read_manifest

    manifest = read_manifest(repo)
    images = [b for _, b in sample_images(image_dir, 64)]
    with variant_servers(repo, out, servers) as (targets, running):
        r = compare(targets, images, rounds, seconds, connections)
        if after is not None:
            r.update(after(running))
    r.update(repo=str(repo), layout=manifest["layout"], settings=manifest["settings"])
    return r


def command(description: str, out: Path, measure: Callable[..., dict],
            markdown: Callable[[dict], str] = render_markdown, options: dict[str, dict[str, Any]] | None = None,
            ) -> tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], dict]]:
    """The command line of a side-by-side measurement, ``measure(repo, images, out, rounds, seconds,
    connections, **options)``, as an experiment's ``(get_args_parser, main)`` (perf/ab/registry.py):
    ``options`` maps each extra flag to its add_argument keywords, and its value is passed by the flag's name
    (``--flood-connections`` as ``flood_connections``). ``main`` writes report.json and report.md to --out
    and prints the Markdown."""
    def get_args_parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=description)
        p.add_argument("--repo", type=Path, default=Path("model_repository"))
        p.add_argument("--images", type=Path, required=True)
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--seconds", type=int, default=10)
        p.add_argument("--connections", type=int, default=16)
        p.add_argument("--out", type=Path, default=out)
        for flag, kw in (options or {}).items():
            p.add_argument(flag, **kw)
        return p

    def main(a: argparse.Namespace) -> dict:
        names = [flag.lstrip("-").replace("-", "_") for flag in options or {}]
        extra = {name: getattr(a, name) for name in names}
        try:
            result = measure(a.repo, a.images, a.out, a.rounds, a.seconds, a.connections, **extra)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from e
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "report.json").write_text(json.dumps(result, indent=2))
        (a.out / "report.md").write_text(markdown(result))
        print(markdown(result))
        return result

    return get_args_parser, main
