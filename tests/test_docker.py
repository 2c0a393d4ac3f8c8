"""The GPU image's commands, read as the image will run them (no Docker engine here): every Python command
exists in the base image as recorded in docker/base-image.json, `make -C docker engine` passes the
settings `make engine` does, the build context leaves out what must not go into the image, and the
image's test tools are locked."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from clients.keys import ADMIN, INFERENCE

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
FACTS = json.loads((DOCKER / "base-image.json").read_text())
IMAGE = dict(line.split("=", 1) for line in (DOCKER / "k8s" / "image.env").read_text().splitlines()
             if line and not line.startswith("#"))["IMAGE"]


def commands_run_in_the_image() -> list[str]:
    """Every shell command the image runs: the Makefile's $(RUN) lines as make expands them, compose's
    command, the Dockerfile's RUN and CMD lines."""
    out = subprocess.run(["make", "-n", "-C", str(DOCKER), "engine", "gpu-check", "test-gpu"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    lines = out.replace("\\\n", " ").splitlines()
    image = f" {IMAGE} "
    runs = [line.split(image, 1)[1] for line in lines if line.startswith("docker run ")]
    assert runs
    assert all(image in line for line in lines if line.startswith("docker run "))
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["triton"]["command"]
    dockerfile = [line.split(" ", 1)[1] for line in (DOCKER / "Dockerfile").read_text().splitlines()
                  if line.startswith(("RUN ", "CMD "))]
    return [*runs, compose[-1], *dockerfile]


def test_the_base_image_is_the_one_recorded():
    assert f"FROM {FACTS['image']}" in (DOCKER / "Dockerfile").read_text()


def test_every_python_command_exists_in_the_image():
    commands = commands_run_in_the_image()
    assert len(commands) >= 5
    for command in commands:
        for word in re.findall(r"(?<![\w/.-])(python[\d.]*)(?=\s)", command + " "):
            assert word in FACTS["python_commands"], f"{word!r} is not in the image ({command})"


def test_docker_engine_passes_the_settings_and_sparsity():
    out = subprocess.run(["make", "-n", "-C", str(DOCKER), "engine", "MAX_BATCH=64", "PREFERRED=8 16",
                          "SPARSITY=2:4", "PRECISION=int8"], capture_output=True, text=True, timeout=60,
                         check=True).stdout.replace("\\\n", " ")
    line = next(x for x in out.splitlines() if "build.engine" in x)
    words = shlex.split(line)
    assert words[words.index("--max-batch-size") + 1] == "64"
    assert words[words.index("--preferred-batch-sizes") + 1:words.index("--preferred-batch-sizes") + 3] == ["8", "16"]
    assert "--sparsity" in words
    assert "model_int8.onnx" in line
    assert "--repo" in words


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule, for the patterns used here: the last matching pattern wins, ! re-includes, a
    pattern matches a path or any folder above it."""
    verdict = False
    parts = path.split("/")
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pat) or (pat.startswith("**/") and fnmatch.fnmatchcase(p.split("/")[-1],
                                                                                             pat[3:]))
               for p in prefixes):
            verdict = not negate
    return verdict


def test_the_build_context_holds_the_source_and_nothing_else():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", ".venv-ray/bin/python", ".cache/admin.key", "data/synthetic/train/a.jpg",
                 "artifacts/model.onnx", "model_repository/classify/1/model.onnx",
                 "model_repository_gpu/classifier/1/model.plan", "perf/reports/report.html", ".git/HEAD",
                 "core/__pycache__/stages.cpython-311.pyc"):
        assert ignored(path, patterns), f"{path} would go into the image"
    for path in ("served/stages.py", "build/engine.py", "served/models/dali.py", "docker/requirements-gpu.lock",
                 "model_repository/README.md", "tests/test_docker.py", "Makefile", "mk/settings.mk"):
        assert not ignored(path, patterns), f"{path} is left out of the image"


def test_the_images_test_tools_are_locked():
    locked = {line.split("==")[0].lower() for line in (DOCKER / "requirements-gpu.lock").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {"pytest", "pytest-timeout"} <= locked  # pyproject.toml's timeout = 600 needs the plugin


def run_entrypoint(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A deployment's `sh -c` command here, with what only the image has stood in for: the plan check passes,
    python3 is this interpreter, and tritonserver prints its arguments instead of starting."""
    script = script.replace("python3 -m build.engine --verify /models", "true")
    script = script.replace("python3", sys.executable).replace("exec tritonserver", "exec echo tritonserver")
    base = {k: v for k, v in os.environ.items() if k not in (ADMIN.env, INFERENCE.env)}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**base, **env})


def test_every_deployment_requires_both_keys():
    """Compose and Kubernetes run Triton on every interface of the container: it starts only with both keys,
    and then requires them (the flags clients.keys makes); KServe takes the same flags from the same Secret."""
    keys = {ADMIN.env: "admin-0123456789", INFERENCE.env: "inference-0123456789"}
    expected = [*ADMIN.server_args(keys[ADMIN.env]), *INFERENCE.server_args(keys[INFERENCE.env])]
    triton = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["triton"]
    (deployment,) = [d for d in yaml.safe_load_all((DOCKER / "k8s" / "deployment.yaml").read_text())]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "triton-keys"}} in container["envFrom"]
    assert set(triton["environment"]) == set(keys)
    # compose escapes $ as $$ in its files
    for script in (triton["command"][-1].replace("$$", "$"), container["args"][-1]):
        started = run_entrypoint(script, keys)
        assert started.returncode == 0, started.stderr
        words = started.stdout.split()
        assert words[0] == "tritonserver", words
        assert all(flag in words for flag in expected), words
        for missing in keys:
            refused = run_entrypoint(script, {k: v for k, v in keys.items() if k != missing})
            assert refused.returncode != 0
            assert "tritonserver" not in refused.stdout
            assert missing in refused.stderr
    isvc = yaml.safe_load((DOCKER / "k8s" / "kserve" / "inferenceservice.yaml").read_text())["spec"]["predictor"]
    model = isvc["model"]
    for key in (ADMIN, INFERENCE):  # Kubernetes expands $(VAR) in args from the container's env
        assert all(flag in model["args"] for flag in key.server_args(f"$({key.env})"))
        assert {"name": key.env, "valueFrom": {"secretKeyRef": {"name": "triton-keys", "key": key.env}}} in model["env"]


# KServe's stock Triton runtime (kserve/kserve config/runtimes/kserve-tritonserver.yaml): its container's resources,
# into which KServe merges the predictor's container (pkg/utils/container_merge.go: a strategic merge patch)
KSERVE_TRITON_RUNTIME_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}


def merged(base: dict, patch: dict) -> dict:
    """A strategic merge patch of maps (what a container's resources are): keys merged, leaves replaced."""
    out = dict(base)
    for key, value in patch.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes): 500m, 4, 2Gi, 512Mi."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_the_kserve_predictor_merged_into_its_runtime_is_admissible():
    """Kubernetes refuses a container whose request of a resource exceeds its limit: after KServe's merge into
    the runtime (limit cpu 1), every request of the predictor is within its limit."""
    isvc = yaml.safe_load((DOCKER / "k8s" / "kserve" / "inferenceservice.yaml").read_text())
    resources = merged(KSERVE_TRITON_RUNTIME_RESOURCES, isvc["spec"]["predictor"]["model"]["resources"])
    over = {name: (request, resources["limits"].get(name)) for name, request in resources["requests"].items()
            if name in resources["limits"] and quantity(request) > quantity(resources["limits"][name])}
    assert over == {}
    assert quantity(resources["requests"]["cpu"]) == 4  # the predictor's own request survives the merge
    assert merged({"a": {"b": "1", "c": "2"}}, {"a": {"b": "3"}}) == {"a": {"b": "3", "c": "2"}}


def test_every_secret_a_manifest_reads_is_generated_or_documented_with_its_keys():
    """A Secret no manifest generates and no doc describes leaves pods in CreateContainerConfigError."""
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key in ("secretRef", "secretKeyRef"):
                if isinstance(node.get(key), dict):
                    names.add(node[key]["name"])
            if node.get("kind") == "ServiceAccount":
                names.update(s["name"] for s in node.get("secrets", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    generated = set()
    for path in (DOCKER / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc)
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                generated.add(doc["metadata"]["name"])
    kustomization = yaml.safe_load((DOCKER / "k8s" / "kustomization.yaml").read_text())
    generated |= {g["name"] for g in kustomization.get("secretGenerator", [])}
    assert {"triton-keys", "model-store-credentials"} <= names
    readme = (DOCKER / "README.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", readme, re.M)}
    undocumented = sorted(n for n in names - generated
                          if n not in rows or f"kubectl create secret generic {n}" not in rows[n])
    assert undocumented == []


def test_the_image_check_asks_the_servers_own_environment_for_the_backends_dali():
    """`make -C docker check`: the DALI that `import nvidia.dali` finds with the server's environment (no
    PYTHONPATH of ours) must be the DALI backend's, the version base-image.json records."""
    out = subprocess.run(["make", "-n", "-C", str(DOCKER), "check"], capture_output=True, text=True, timeout=60,
                         check=True).stdout.replace("\\\n", " ")
    (line,) = [x for x in out.splitlines() if "import nvidia.dali" in x]
    assert f"docker run --rm {IMAGE} python3 -c" in line
    assert "PYTHONPATH" not in line
    assert f"{FACTS['dali_backend_dali']}|{FACTS['dali_backend_dali']}.*)" in line


def test_the_containers_gpu_targets_pass_what_the_top_level_ones_do():
    out = subprocess.run(["make", "-n", "-C", str(DOCKER), "gpu-check", "test-gpu", "MAX_TOP1_DROP=2"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.replace("\\\n", " ")
    (check,) = [x for x in out.splitlines() if "perf.checks.gpu_check" in x]
    assert "--data data/synthetic" in check
    assert "--repo model_repository_gpu" in check
    assert "--max-top1-drop 2" in check
    (tests,) = [x for x in out.splitlines() if "-m pytest" in x]
    assert tests.rstrip().endswith("-m pytest -m gpu -ra tests")  # every gpu-marked test, not one file's
