"""The docs check: every relative link and `#anchor`, every repository path and every `make` target that
README.md, docs/*.md and docker/README.md name exists; the README's quickstarts pass `make -n`; and a
throughput figure or ratio written outside docs/results.md is one that page holds. Each failure names the
doc, the line and the broken thing. (The variables of documented make commands: tests/test_makefile.py.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
QUICKSTARTS = ("Try it", "Your data", "A pretrained model as it is", "An ONNX file", "Fine-tuning", "A GPU host",
               "Load-testing your deployment")


def docs() -> list[Path]:
    return [README, ROOT / "docker" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def lines(doc: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, inside a fenced code block) for each line of ``doc`` but the fences themselves."""
    fenced = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        yield n, line, fenced


def code_spans(line: str) -> list[str]:
    return re.findall(r"`([^`]+)`", line)


# (a) links and anchors

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped but '-' and '_', spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text, not its target
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line, fenced in lines(doc):
        m = re.match(r"#{1,6} +(.+?) *#*$", line)
        if m and not fenced:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")  # GitHub numbers repeated headings
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(doc: Path) -> list[str]:
    broken = []
    for n, line, fenced in lines(doc):
        if fenced:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = (doc.parent / path).resolve() if path else doc
            if not where.exists():
                broken.append(f"{rel(doc)}:{n}: link to {target}: no file {path}")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{rel(doc)}:{n}: link to {target}: no heading #{anchor} in {where.relative_to(ROOT)}")
    return broken


def test_every_relative_link_and_anchor_resolves():
    broken = [b for doc in docs() for b in broken_links(doc)]
    assert not broken, "\n".join(broken)


def test_the_slug_is_githubs():
    assert slug("Importing a model trained elsewhere (`make import`, `build/import_onnx.py`)") == \
        "importing-a-model-trained-elsewhere-make-import-buildimport_onnxpy"
    assert slug("The training loop (`python -m training.train`)") == "the-training-loop-python--m-trainingtrain"
    assert slug("make eval's memory, 2026-11-23") == "make-evals-memory-2026-11-23"


# (b) repository paths

PATH = re.compile(r"(\.\./)*[\w.-]+(/[\w.-]+)*/?")


def ignored(paths: set[str]) -> set[str]:
    """The paths git ignores: outputs (artifacts/, data/, perf/reports/, ...) that a fresh clone lacks."""
    r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "--stdin"], input="\n".join(paths),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    return set(r.stdout.splitlines())


def named_paths(doc: Path) -> Iterator[tuple[int, str, Path]]:
    """(line, the path as written, the file it names) for each backticked token that is clearly a path in the
    repository: a '/' and an extension or a trailing '/', its first folder a top-level folder of the repository
    (or, for docker/README.md, of docker/); globs and placeholders (`<class>`, `*`, `{a,b}`) are not paths."""
    for n, line, fenced in lines(doc):
        if fenced:
            continue
        for span in code_spans(line):
            token = span.split()[0].rstrip(":,;") if span.split() else ""
            if "/" not in token or not PATH.fullmatch(token):
                continue
            if not (token.endswith("/") or re.search(r"\.\w+$", token.rsplit("/", 1)[-1])):
                continue
            first = token.split("/")[0]
            if first == "..":
                base = doc.parent
            elif (ROOT / first).is_dir() and not first.startswith("."):
                base = ROOT
            elif doc.parent != ROOT and (doc.parent / first).is_dir():
                base = doc.parent
            else:
                continue
            yield n, token, (base / token).resolve()


def test_every_repository_path_the_docs_name_exists():
    found = [(doc, n, token, path) for doc in docs() for n, token, path in named_paths(doc)]
    assert len(found) > 100
    # a folder git ignores by a pattern with a trailing '/' (perf/reports/) is only matched as a folder: a fresh
    # clone lacks it, so it is asked about with the slash too
    names = {str(p.relative_to(ROOT)) for *_, p in found if p.is_relative_to(ROOT)}
    outputs = ignored(names | {name + "/" for name in names})
    missing = [f"{rel(doc)}:{n}: `{token}` does not exist" for doc, n, token, path in found
               if not path.exists() and not (path.is_relative_to(ROOT) and
                                             {str(path.relative_to(ROOT)), f"{path.relative_to(ROOT)}/"} & outputs)]
    assert not missing, "\n".join(missing)


# (c) make targets

def targets(makefile: Path) -> set[str]:
    """The targets a Makefile defines by name (not files like $(VENV)/.installed, not pattern rules)."""
    out = set()
    for line in makefile.read_text().splitlines():
        m = re.match(r"([^\s:#=][^:=]*?)\s*::?(?!=)", line)
        if m:
            out |= {t for t in m.group(1).split() if "$" not in t and "%" not in t and "/" not in t}
    return out


MAKEFILES = {None: targets(ROOT / "Makefile"), "docker": targets(ROOT / "docker" / "Makefile")}


def make_commands(text: str) -> Iterator[tuple[str | None, list[str]]]:
    """(the -C folder, the targets) of each `make ...` in ``text``, up to the first word that is not a target."""
    for m in re.finditer(r"(?<![\w./-])make\s+([^&|;#>]*)", text):
        try:
            words = shlex.split(m.group(1))
        except ValueError:  # an unbalanced quote in prose
            words = m.group(1).split()
        folder, named, skip = None, [], False
        for i, word in enumerate(words):
            if skip:
                skip = False
                continue
            if word in ("-C", "-f"):
                folder, skip = (words[i + 1] if word == "-C" and i + 1 < len(words) else folder), True
                continue
            if word.startswith("-") or re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word):
                if word.rstrip("),;") != word:  # "(make ab WHAT=...), one module each" ends there
                    break
                continue
            bare = word.rstrip("),;:.'\"")
            if not re.fullmatch(r"[a-z][a-z0-9_.-]*", bare):
                break
            named.append(bare)
            if bare != word:  # "(make tune)", "make report: ..." end the command
                break
        yield folder, named


def unknown_targets(doc: Path) -> list[str]:
    bad = []
    for n, line, fenced in lines(doc):
        texts = [line.split(" #")[0]] if fenced else code_spans(line)
        for text in texts:
            for folder, named in make_commands(text):
                known = MAKEFILES.get(folder)
                if known is None and folder is not None:
                    bad.append(f"{rel(doc)}:{n}: make -C {folder}: no Makefile checked there")
                    continue
                bad += [f"{rel(doc)}:{n}: make {'-C ' + folder + ' ' if folder else ''}{t}: no such target"
                        for t in named if t not in (known or set())]
    return bad


def test_every_make_target_the_docs_name_exists():
    assert len(MAKEFILES[None]) > 40
    assert {"engine", "gpu-check", "serve", "lock"} <= MAKEFILES["docker"]
    unknown = [b for doc in docs() for b in unknown_targets(doc)]
    assert not unknown, "\n".join(unknown)


def test_the_target_parser_reads_commands_as_make_does():
    assert list(make_commands('make repo PREFERRED="8 16" TARGET=gpu && make serve')) == [(None, ["repo"]),
                                                                                          (None, ["serve"])]
    assert list(make_commands("make -C docker image push")) == [("docker", ["image", "push"])]
    assert list(make_commands("the report (make report: measure, analysis)")) == [(None, ["report"])]
    assert list(make_commands("make ab WHAT=<name>")) == [(None, ["ab"])]
    assert list(make_commands("(python -m perf.ab WHAT, make ab WHAT=...), one module each")) == [(None, ["ab"])]


# (d) the README's quickstarts

def quickstarts() -> dict[str, list[tuple[int, str]]]:
    """Each subsection of the README's Quickstarts: (line, command) of its bash blocks, comments dropped."""
    out: dict[str, list[tuple[int, str]]] = {}
    section, title, in_bash = False, None, False
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("## "):
            section = line == "## Quickstarts"
        elif section and line.startswith("### "):
            title = line[4:].strip()
            out[title] = []
        elif section and title and line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
        elif in_bash and title and line.split("#")[0].strip():
            out[title].append((n, line.split(" #")[0].strip()))
    return out


def make_argv(command: str) -> list[str] | None:
    """The arguments of a `make` command (after any VAR=value prefix and a trailing '&'); None if not make."""
    words = shlex.split(command.rstrip("& "))
    while words and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    return words[1:] if words and words[0] == "make" else None


def test_the_readme_has_a_quickstart_per_task_and_keeps_the_test_command():
    text = README.read_text()
    assert "make test" in text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make test\b", (ROOT / ".ci" / "run").read_text(), re.M)
    blocks = quickstarts()
    assert list(blocks) == list(QUICKSTARTS)
    assert [title for title, commands in blocks.items() if not commands] == []


@pytest.mark.parametrize("task", QUICKSTARTS)
def test_every_quickstart_command_passes_make_dry_run(task):
    """`make -n` on each command of the quickstart, from the repository root: it must parse, know the targets
    and variables and print its recipe (the GPU ones too: the issue's allowance). `make -n` runs no recipe but
    those that call $(MAKE), which it runs as dry runs too. None of them is skipped: no quickstart target reads
    files while make parses the Makefile."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    failures = []
    for n, line in quickstarts()[task]:
        for command in re.split(r"&&|;", line):
            argv = make_argv(command.strip())
            if argv is None:
                failures.append(f"README.md:{n}: `{command.strip()}` is not a make command: no check runs it")
                continue
            r = subprocess.run(["make", "-n", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                failures.append(f"README.md:{n}: `make -n {shlex.join(argv)}` failed: {r.stderr.strip()[-500:]}")
    assert not failures, "\n".join(failures)


# figures: written once, on the results page

FIGURE = re.compile(r"(\d[\d,]*(?:\.\d+)?) ?(?:img/s|images/s)|(\d+\.\d+)×")


def test_every_figure_outside_the_results_page_is_on_it():
    """A throughput (img/s, images/s) or a ratio (1.34×) that another page names must be one the results page
    holds, so a figure copied elsewhere cannot drift from the measurement."""
    held = RESULTS.read_text()
    stray = []
    for doc in docs():
        if doc == RESULTS:
            continue
        for n, line, _ in lines(doc):
            for m in FIGURE.finditer(line):
                figure = m.group(1) or m.group(2)
                if not re.search(rf"(?<![\d.,]){re.escape(figure)}(?![\d]|[.,]\d)", held):
                    stray.append(f"{rel(doc)}:{n}: {m.group(0)} is not on docs/results.md")
    assert not stray, "\n".join(stray)
