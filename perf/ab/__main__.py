"""python -m perf.ab WHAT [options]: one A/B measurement of the registry (perf/ab/registry.py)."""

import sys

from perf.ab.registry import run

if __name__ == "__main__":
    run(sys.argv[1:])
