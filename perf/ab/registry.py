"""The registry of A/B measurements and its one entry point, ``python -m perf.ab WHAT [options]``.

An experiment is a record: its name on the command line, the module that holds it and a line for the list.
The module gives ``get_args_parser()`` (its options) and ``main(args)`` (measures, writes its report, returns
the result); it is imported only when it runs, so the list stays quick. A new A/B measurement is its module
plus one entry in EXPERIMENTS (and, for a make target of its own, an ``AB_ARGS_<name>`` line in the Makefile).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

PROG = "python -m perf.ab"


@dataclass(frozen=True)
class Experiment:
    name: str      # python -m perf.ab NAME, make ab WHAT=NAME
    module: str    # gives get_args_parser() and main(args)
    summary: str   # one line for the list

    def load(self) -> ModuleType:
        module = importlib.import_module(self.module)
        for attr in ("get_args_parser", "main"):
            if not callable(getattr(module, attr, None)):
                raise TypeError(f"experiment {self.name!r}: {self.module} has no {attr}()")
        return module

    def parser(self) -> argparse.ArgumentParser:
        p = self.load().get_args_parser()
        p.prog = f"{PROG} {self.name}"
        return p

    def run(self, argv: Sequence[str]) -> object:
        return self.load().main(self.parser().parse_args(list(argv)))


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("metrics-cost", "perf.ab.metrics_cost", "the served metrics on and off (make metrics-cost)"),
    Experiment("client-metrics-cost", "perf.ab.client_metrics_cost",
               "the client library's served metrics on and off, to the client (make client-metrics-cost)"),
    Experiment("shadow-cost", "perf.ab.shadow_cost", "what shadowing costs the clients: the mirror off and on "
               "(make shadow-cost)"),
    Experiment("cache", "perf.ab.cache", "the response cache off, hitting, missing (make cache-check)"),
    Experiment("batch-fit", "perf.ab.batch_fit",
               "the preferred batch fitted to the model's cost against none (make batch-fit)"),
    Experiment("instances", "perf.ab.instances", "the served model's instances x threads on this machine's cores"),
    Experiment("flood", "perf.ab.flood", "goodput under a flood: the queue held by time against a count of 64 "
               "(make flood-check)"),
    Experiment("precisions", "perf.ab.precisions",
               "the served precisions (fp32, fp16, int8) with the same settings, perf_analyzer (make precisions)"),
    Experiment("pruned", "perf.ab.pruned", "a pruned model against its unpruned original, served (make prune)"),
)}


def listing() -> str:
    width = max(len(name) for name in EXPERIMENTS) + 2
    return "\n".join([f"usage: {PROG} WHAT [options]      ({PROG} WHAT --help: its options)", "",
                      "The A/B measurements, each side by side in alternating rounds; WHAT is one of:", "",
                      *(f"  {name:<{width}}{e.summary}" for name, e in EXPERIMENTS.items())])


def run(argv: Sequence[str]) -> object:
    """``WHAT [options]``: that experiment run with its options; ``list``, ``--help`` or nothing: the list."""
    if not argv or argv[0] in ("list", "-h", "--help"):
        print(listing())
        return None
    what, *rest = argv
    if what not in EXPERIMENTS:
        print(listing(), file=sys.stderr)
        raise SystemExit(f"\nerror: unknown experiment {what!r}; choose from {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[what].run(rest)
