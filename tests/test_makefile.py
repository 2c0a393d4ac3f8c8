"""The Makefile is the user interface: `make help` lists every target it defines, grouped by stage, and
`make help-vars` every variable with its default, both read from the Makefile itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAKEFILES = (ROOT / "Makefile", ROOT / "mk" / "settings.mk")


def make(*args: str) -> str:
    r = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def targets() -> set[str]:
    """The Makefile's named targets (not files such as $(VENV)/.installed, not pattern rules)."""
    text = (ROOT / "Makefile").read_text()
    return {m for m in re.findall(r"^([a-z][a-z0-9-]*):(?!=)", text, re.M)}


def test_make_help_lists_every_target_with_what_it_does():
    listed = dict(re.findall(r"^  make (\S+) +(.+)$", make("help"), re.M))
    assert len(targets()) > 40
    assert sorted(targets() - set(listed)) == []
    assert all(len(text) > 10 for text in listed.values()), listed
    groups = [line for line in make("help").splitlines() if line and not line.startswith(" ")]
    assert groups[:3] == ["start", "setup", "stages"]


def test_make_help_vars_lists_every_variable_with_its_default():
    listed = dict(re.findall(r"^  ([A-Z][A-Z0-9_]*) +(\S+)", make("help-vars"), re.M))
    defined = {name for f in MAKEFILES for name in re.findall(r"^([A-Z][A-Z0-9_]*) *\?=", f.read_text(), re.M)}
    assert len(defined) > 100
    assert sorted(defined - set(listed)) == []
    assert listed["ARCH"] == "resnet_tiny"
    assert listed["MAX_BATCH"] == "(unset)"


def test_every_variable_a_documented_make_command_sets_exists():
    """`make repo FOO=1` in a doc with no FOO in the Makefiles would be silently ignored by make."""
    defined = {name for f in (*MAKEFILES, ROOT / "docker" / "Makefile")
               for name in re.findall(r"^([A-Z][A-Z0-9_]*) *[:?]?=", f.read_text(), re.M)}
    docs = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(var, doc.name) for doc in docs for command in re.findall(r"make [^`\n|]*", doc.read_text())
             for var in re.findall(r"\b([A-Z][A-Z0-9_]{2,})=", command)}
    assert len(named) > 50
    assert sorted((var, doc) for var, doc in named if var not in defined) == []


def test_the_settings_variables_become_the_render_flags():
    out = make("-n", "repo", "SERVED_METRICS_INTERVAL_MS=0", "PREFERRED=8", "DRIFT_WINDOW=200")
    for flag in ("--served-metrics-interval-ms 0", "--preferred-batch-sizes 8", "--drift-window 200"):
        assert flag in out, flag
