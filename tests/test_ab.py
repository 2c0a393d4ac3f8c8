"""The A/B measurements are a registry run by one entry point (perf/ab/registry.py): a new one is its module
plus one entry. No server, no model: the measurements' command lines only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from perf.ab import registry

ROOT = Path(__file__).resolve().parent.parent

ECHO = '''
import argparse


def get_args_parser():
    p = argparse.ArgumentParser(description="says what it was given")
    p.add_argument("--word", required=True)
    p.add_argument("--times", type=int, default=1)
    return p


def main(a):
    return {"said": [a.word] * a.times}
'''


def test_a_new_ab_measurement_is_one_registry_entry(tmp_path, monkeypatch, capsys):
    """An experiment added to the registry alone is listed, has its own --help, and runs with its options."""
    (tmp_path / "ab_echo.py").write_text(ECHO)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.EXPERIMENTS, "echo", registry.Experiment("echo", "ab_echo", "says it again"))
    for first in ("list", "--help"):
        assert registry.run([first]) is None
        assert "  echo" in capsys.readouterr().out
    assert registry.run(["echo", "--word", "ab", "--times", "2"]) == {"said": ["ab", "ab"]}
    with pytest.raises(SystemExit) as e:
        registry.run(["echo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m perf.ab echo" in out
    assert "--times" in out
    with pytest.raises(SystemExit):  # its own options are checked by its own parser
        registry.run(["echo", "--times", "2"])


def test_an_unknown_measurement_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit, match="unknown experiment 'nothing'"):
        registry.run(["nothing"])
    assert "metrics-cost" in capsys.readouterr().err


# each measurement's options as its own script took them (the Makefile's AB_ARGS_<name> pass them)
OPTIONS = {
    "metrics-cost": {"--repo", "--images", "--rounds", "--seconds", "--connections", "--out"},
    "cache": {"--repo", "--images", "--rounds", "--seconds", "--connections", "--out"},
    "batch-fit": {"--repo", "--images", "--rounds", "--seconds", "--connections", "--out"},
    "instances": {"--repo", "--images", "--rounds", "--seconds", "--connections", "--out"},
    "flood": {"--repo", "--images", "--rounds", "--seconds", "--connections", "--out", "--flood-connections"},
    "shadow-cost": {"--repo", "--images", "--rounds", "--seconds", "--connections", "--out", "--percent"},
    "client-metrics-cost": {"--repo", "--images", "--rounds", "--seconds", "--clients", "--out"},
    "precisions": {"--repo", "--artifacts", "--images", "--out", "--precisions", "--rounds", "--concurrency",
                   "--protocol", "--interval-ms"},
    "pruned": {"--unpruned", "--pruned", "--repo", "--images", "--rounds", "--concurrency", "--protocol",
               "--interval-ms", "--request-count"},
}


def test_every_registered_measurement_keeps_its_options():
    assert set(registry.EXPERIMENTS) == set(OPTIONS)
    for name, experiment in registry.EXPERIMENTS.items():
        parser = experiment.parser()
        assert parser.prog == f"python -m perf.ab {name}"
        assert set(parser._option_string_actions) - {"-h", "--help"} == OPTIONS[name], name


def test_the_entry_point_lists_every_measurement():
    r = subprocess.run([sys.executable, "-m", "perf.ab", "list"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"  {name} " in r.stdout for name in registry.EXPERIMENTS), r.stdout


def test_the_side_by_side_command_line_passes_its_options_and_writes_the_report(tmp_path, capsys):
    """perf/ab/variants.py's command: the shared flags and the extra ones reach measure(), and report.json and
    report.md land in --out."""
    import json

    from perf.ab.variants import command

    def measure(repo, images, out, rounds, seconds, connections, flood_connections):
        return {"args": [str(repo), str(images), str(out), rounds, seconds, connections, flood_connections]}

    get_args_parser, main = command("a measurement", tmp_path / "default", measure, lambda r: f"# {r['args'][-1]}\n",
                                    {"--flood-connections": {"type": int, "default": 256}})
    a = get_args_parser().parse_args(["--images", "imgs", "--rounds", "2", "--out", str(tmp_path / "out")])
    r = main(a)
    assert r["args"] == ["model_repository", "imgs", str(tmp_path / "out"), 2, 10, 16, 256]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == r
    assert (tmp_path / "out" / "report.md").read_text() == "# 256\n"
    assert "# 256" in capsys.readouterr().out
