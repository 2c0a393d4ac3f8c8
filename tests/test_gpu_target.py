"""The GPU target, checked without a GPU: what its server loads, what its container installs, how it
is deployed. Each test here stands for a defect a review of the GPU path found (issue 11); the parts
that need a GPU are in tests/test_precision.py, marked ``gpu``."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from conftest import MAX_BATCH
from google.protobuf.internal.decoder import _DecodeVarint

from build import layouts
from build.engine import EngineEnvironmentError, server_tensorrt_version, verify_repository
from build.layouts import PIPELINE_FILE
from build.model_config import check_ensemble, read_configs
from build.render_repo import GRAPH_FILE, PACKAGE, PIPELINE_CONFIG, autoserialize, package_files, render
from build.settings import BatchProfile, RepoSettings, read_manifest
from clients.client import ImageClassifierClient
from core import protocol as P
from core.metadata import read_metadata
from serve.server import TritonServer

ROOT = Path(__file__).resolve().parent.parent


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message as (field number, value) pairs: enough to read DALI's serialized pipeline
    (dali/pipeline/proto/dali.proto) without its generated module, which the DALI wheel does not ship."""
    pos, out = 0, []
    while pos < len(buf):
        tag, pos = _DecodeVarint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _DecodeVarint(buf, pos)
        elif wire == 2:
            n, pos = _DecodeVarint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            size = 4 if wire == 5 else 8
            value, pos = buf[pos:pos + size], pos + size
        out.append((number, value))
    return out


def dali_operators(serialized: bytes) -> dict[str, dict[str, object]]:
    """operator name -> {argument: value} for the string and bool arguments of a serialized pipeline."""
    ops = {}
    for number, op in _fields(serialized):
        if number != 5:  # PipelineDef.op
            continue
        fields = _fields(op)
        name = next(v for n, v in fields if n == 1).decode()
        args = {}
        for n, arg in fields:
            if n != 4:  # OpDef.args
                continue
            a = dict(_fields(arg))
            kind = a[2].decode()
            if kind == "string":
                args[a[1].decode()] = a.get(5, b"").decode()
            elif kind == "bool":
                args[a[1].decode()] = bool(a.get(6, 0))
        ops[name] = args
    return ops


def test_gpu_pipeline_is_left_to_the_servers_own_dali(onnx_model, tmp_path):
    """The GPU server's DALI (1.42 in the 24.10 image) may reject a pipeline serialized by pip's newer DALI:
    the GPU repository carries the pipeline's definition, which the DALI backend serializes itself, and
    no model.dali; a stale one from an earlier render is removed (the backend would load it first)."""
    repo = tmp_path / "gpu"
    (repo / P.PREPROCESS / "1").mkdir(parents=True)
    (repo / P.PREPROCESS / "1" / "model.dali").write_bytes(b"serialized by another DALI")
    render(onnx_model, repo, RepoSettings(max_batch_size=16, dali_threads=3), target="gpu")
    version = repo / P.PREPROCESS / "1"
    assert sorted(p.name for p in version.iterdir()) == sorted([PIPELINE_FILE, PACKAGE, PIPELINE_CONFIG])
    assert (version / GRAPH_FILE).read_bytes() == (ROOT / GRAPH_FILE).read_bytes()  # the one graph definition
    config = read_configs(repo)[P.PREPROCESS]
    assert config.backend == "dali"
    assert config.default_model_filename == PIPELINE_FILE
    assert config.parameters["num_threads"].string_value == "3"

    # what the backend does on load, with only DALI importable (autoserialize drops PYTHONPATH); the
    # spec's device_id is 0, which needs CUDA to serialize here, so None stands in (the server sets the
    # device at load anyway)
    files = {str(p.relative_to(version)): p.read_bytes() for p in version.rglob("*") if p.is_file()}
    spec = json.loads(files[PIPELINE_CONFIG])
    assert spec["device"] == "gpu"
    assert spec["device_id"] == 0
    assert spec["max_batch_size"] == 16
    files[PIPELINE_CONFIG] = json.dumps({**spec, "device_id": None}).encode()
    ops = dali_operators(autoserialize(files))
    assert ops["ExternalSource"]["device"] == "cpu"
    # nvJPEG upsamples 4:2:0 chroma like libjpeg-turbo only when asked: without it the devices disagree
    assert ops["decoders__Image"]["device"] == "mixed"
    assert ops["decoders__Image"]["jpeg_fancy_upsampling"] is True
    assert ops["Resize"]["device"] == ops["CropMirrorNormalize"]["device"] == "gpu"


def test_embedded_pipeline_is_serialized_from_the_same_definition(repo):
    """The embedded server deserializes model.dali, made from the very dali.py the GPU server serializes."""
    version = repo / layouts.get(read_manifest(repo)["layout"]).pipeline_model / "1"
    files = {name: (version / name).read_bytes() for name in (PIPELINE_FILE, *package_files(), PIPELINE_CONFIG)}
    assert files[GRAPH_FILE] == (ROOT / GRAPH_FILE).read_bytes()
    assert json.loads(files[PIPELINE_CONFIG])["device"] == "cpu"
    served = dali_operators((version / "model.dali").read_bytes())
    assert served == dali_operators(autoserialize(files))
    assert served["decoders__Image"]["device"] == "cpu"


def test_container_server_serializes_with_its_own_dali(tmp_path):
    """In the NGC image the DALI backend's own DALI is on PYTHONPATH; the image must not replace it, and a
    server started from our Python (whose PYTHONPATH is /workspace, pip's DALI behind) gets it back first."""

    env_lines = [line for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
                 if line.strip().upper().startswith("ENV") and "PYTHONPATH" in line]
    assert env_lines == [], env_lines
    install = tmp_path / "opt" / "tritonserver"
    (install / "bin").mkdir(parents=True)
    (install / "bin" / "tritonserver").write_text("#!/bin/sh\n")
    wheel = install / "backends" / "dali" / "wheel" / "dali"
    wheel.mkdir(parents=True)
    env = TritonServer(tmp_path, binary=install / "bin" / "tritonserver").environment()
    assert env["PYTHONPATH"].split(":")[0] == str(wheel)


LOCK = ROOT / "docker" / "requirements-gpu.lock"
# what this machine installs for a package, and what the container installs for it instead
CONTAINER_VARIANT = {"onnxruntime": "onnxruntime-gpu"}


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _locked() -> dict[str, str]:
    pins = [line.split("==") for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#")]
    return {_canonical(name): version.strip() for name, version in pins}


def test_container_installs_what_the_gpu_path_imports():
    """ModelOpt's ONNX quantization imports onnxslim and lief at module level, which its requirements only
    name under the [onnx] extra: the container's locked packages must provide every distribution that the
    GPU path's modules (quantization, engines, the GPU check) import, measured by importing them here."""

    probe = ("import sys, json\n"
             "from importlib.metadata import packages_distributions\n"
             "before = set(sys.modules)\n"
             "import modelopt.onnx.quantization, modelopt.onnx.autocast, build.quantize, build.engine, "
             "perf.checks.gpu_check\n"
             "mods = {m.split('.')[0] for m in set(sys.modules) - before}\n"
             "dists = packages_distributions()\n"
             "print(json.dumps(sorted([m, sorted(dists[m])] for m in mods if m in dists)))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    locked = _locked()
    missing = [(module, dists) for module, dists in json.loads(r.stdout)
               if not any(CONTAINER_VARIANT.get(_canonical(d), _canonical(d)) in locked for d in dists)]
    assert missing == [], f"imported by the GPU path but not installed in the container: {missing}"
    # and the lock is the resolution of requirements-gpu.txt (regenerate with `make -C docker lock`)
    for line in (ROOT / "docker" / "requirements-gpu.txt").read_text().splitlines():
        name = line.split("#")[0].strip().split("[")[0].split("==")[0].split("<")[0].split(">")[0]
        assert not name or _canonical(name) in locked, f"{name} is in requirements-gpu.txt but not in the lock"


def test_container_packages_are_cuda_12_builds():
    """The 24.10 image is CUDA 12.6: a CUDA 13 build (what an unpinned torch resolves to on PyPI since 2.11)
    needs an R580 driver and fails to initialise CUDA on the drivers this image runs on."""
    locked = _locked()
    cuda13 = sorted(n for n in locked if "cu13" in n or (n == "cuda-bindings" and locked[n].startswith("13")))
    assert cuda13 == []
    assert locked["nvidia-cuda-runtime-cu12"].startswith("12.")  # what torch's CUDA build pulls in
    assert locked["tensorrt-cu12"] == "10.5.0"  # the server's TensorRT: plans built in the container load there


def _stand_in_backend(tmp_path: Path, encoded_version: int) -> Path:
    """A shared library linking a 'libnvinfer.so.10' whose getInferLibVersion() returns ``encoded_version``,
    as Triton's TensorRT backend links the server's TensorRT: the loader, ldd and ctypes are real."""


    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the stand-in libraries")
    lib = tmp_path / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    (tmp_path / "nvinfer.c").write_text(f"int getInferLibVersion(void) {{ return {encoded_version}; }}\n")
    (tmp_path / "backend.c").write_text("int getInferLibVersion(void);\n"
                                        "int backend(void) { return getInferLibVersion(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libnvinfer.so.10", "-o", str(lib / "libnvinfer.so.10"),
                    str(tmp_path / "nvinfer.c")], check=True, timeout=60)
    (lib / "libnvinfer.so").symlink_to("libnvinfer.so.10")
    backend = tmp_path / "libtriton_tensorrt.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(backend), str(tmp_path / "backend.c"), f"-L{lib}", "-lnvinfer",
                    f"-Wl,-rpath,{lib}"], check=True, timeout=60)
    return backend


def test_plans_are_verified_against_the_servers_tensorrt(onnx_model, tmp_path):
    """`build.engine --verify` compared a plan's stamp with the pip bindings' version, which need not be the
    server's: the version now comes from the libnvinfer that the server's TensorRT backend loads."""


    assert server_tensorrt_version(_stand_in_backend(tmp_path / "a", 100500)) == "10.5.0"
    assert server_tensorrt_version(_stand_in_backend(tmp_path / "b", 8601)) == "8.6.1"  # TensorRT 8's encoding
    with pytest.raises(EngineEnvironmentError, match="is missing"):
        server_tensorrt_version(tmp_path / "no_backend.so")
    served = server_tensorrt_version(_stand_in_backend(tmp_path / "c", 100600))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    stamp = {"tensorrt_version": "10.5.0.18", "compute_capability": "9.0", "gpu_name": "NVIDIA H100",
             "precision": "fp16", "profile": {"min": 1, "opt": 4, "max": 8}, "strongly_typed": False,
             "onnx_sha256": hashlib.sha256(onnx_model.read_bytes()).hexdigest()}
    Path(f"{plan}.json").write_text(json.dumps(stamp))
    repo = tmp_path / "gpu"
    render(onnx_model, repo, RepoSettings(max_batch_size=8), target="gpu", plan=plan)
    with pytest.raises(EngineEnvironmentError,
                       match=r"built with TensorRT 10\.5\.0\.18, this runtime is TensorRT 10\.6\.0"):
        verify_repository(repo, served, "9.0")
    assert verify_repository(repo, server_tensorrt_version(_stand_in_backend(tmp_path / "d", 100500)), "9.0")


def _yaml_docs(path: Path) -> list[dict]:

    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(kind: str) -> dict:
    return next(d for p in sorted((ROOT / "docker" / "k8s").glob("*.yaml")) for d in _yaml_docs(p)
                if d.get("kind") == kind)


def test_kubernetes_survives_slow_starts_and_scales_on_triton():
    """Triton opens HTTP only after every model loaded, so the liveness probe alone kills slow starts; GPU pods
    scaled on CPU utilisation never scale; a `:latest` image is pulled on every start."""


    pod = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    startup = pod["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # TensorRT engines can take minutes
    assert pod["imagePullPolicy"] == "IfNotPresent"
    # one image, written once with its registry (k8s/image.env): what docker/Makefile builds and pushes,
    # compose runs (--env-file) and kustomize writes into the Deployment
    k8s = ROOT / "docker" / "k8s"
    env = dict(line.split("=", 1) for line in (k8s / "image.env").read_text().splitlines()
               if line and not line.startswith("#"))
    image = env["IMAGE"]
    registry, _, rest = image.partition("/")
    no_host = f"{image}: without a registry host every node looks it up on Docker Hub"
    assert rest, no_host
    assert "." in registry or ":" in registry or registry == "localhost", no_host
    assert image.rsplit(":", 1)[1] != "latest"
    makefile = (ROOT / "docker" / "Makefile").read_text()
    assert "include k8s/image.env" in makefile
    assert not re.search(r"^IMAGE\s*[:?]?=", makefile, re.M)
    expanded = subprocess.run(["make", "-n", "-C", str(ROOT / "docker"), "push"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    assert f"docker push {image}" in expanded
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert yaml.safe_load(compose)["services"]["triton"]["image"].startswith("${IMAGE:?")
    assert "--env-file k8s/image.env" in makefile
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    generator = next(g for g in kustomization["configMapGenerator"] if g.get("envs") == ["image.env"])
    (replacement,) = kustomization["replacements"]
    assert replacement["source"] == {"kind": "ConfigMap", "name": generator["name"], "fieldPath": "data.IMAGE"}
    (target,) = replacement["targets"]
    deployment = _one("Deployment")
    assert target["select"] == {"kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert target["fieldPaths"] == [f"spec.template.spec.containers.[name={pod['name']}].image"]

    hpa_metrics = _one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in hpa_metrics] == ["Pods"]
    rules = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])["rules"]
    assert hpa_metrics[0]["pods"]["metric"]["name"] in {r["name"]["as"] for r in rules}


def _promql_metrics(expr: str) -> set[str]:

    return set(re.findall(r"\b((?:nv|image_classifier)_[a-z0-9_]+)\b", expr))


def test_dashboard_and_autoscaler_read_metrics_triton_exports(server, val_files):
    """Every Triton metric the Grafana dashboard and the autoscaling rule query, and every model they name,
    exists in the real server's /metrics (GPU metrics aside: this server has no GPU)."""



    with ImageClassifierClient(server.http_url, "http") as c:
        assert c.classify_files(val_files[:2])[0].ok  # so every per-model counter has a sample
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        exported = r.read().decode()
    names = set(re.findall(r"^((?:nv|image_classifier)_[a-z0-9_]+)", exported, re.M))
    models = set(re.findall(r'model="([^"]+)"', exported))
    dashboard = json.loads((ROOT / "docker" / "observability" / "grafana" / "dashboards" / "triton.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r[k] for r in yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])["rules"]
              for k in ("seriesQuery", "metricsQuery")]
    alerts = yaml.safe_load((ROOT / "docker" / "k8s" / "prometheus-alerts.yml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = set().union(*map(_promql_metrics, exprs))
    assert {"nv_inference_queue_duration_us", "nv_inference_request_failure", "nv_gpu_utilization",
            "image_classifier_top1_confidence_bucket", "image_classifier_predictions_total",
            "image_classifier_drift_psi"} <= used
    # the drift score appears once drift_window answers came in (500 by default; this server has seen a
    # few): tests/test_monitoring.py reads it, the alert rule and the panel from a server with a short window
    assert sorted(m for m in used - names if not m.startswith("nv_gpu_") and m != "image_classifier_drift_psi") == []
    named = {m for e in exprs for m in re.findall(r'model="([^"]+)"', e)}
    assert named
    assert named <= models


def _kserve_schema() -> dict:


    # KServe's InferenceService CRD (kserve/kserve config/crd/full/serving.kserve.io_inferenceservices.yaml,
    # commit aaac4e29), kept compressed here: no PyPI package ships it, and kubernetes-validate only knows
    # the core kinds
    with lzma.open(Path(__file__).parent / "fixtures" / "kserve_inferenceservices_crd.yaml.xz") as fh:
        crd = yaml.safe_load(fh.read())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]


def _unknown_fields(doc, schema, where="") -> list[str]:
    """Fields the schema does not declare (the API server would drop them silently): kubernetes-validate's
    --strict, for a CRD."""
    if isinstance(doc, dict) and "properties" in schema:
        out = []
        for k, v in doc.items():
            if k not in schema["properties"]:
                out.append(f"{where}.{k}")
            else:
                out += _unknown_fields(v, schema["properties"][k], f"{where}.{k}")
        return out
    if isinstance(doc, list) and "items" in schema:
        return [u for i, v in enumerate(doc) for u in _unknown_fields(v, schema["items"], f"{where}[{i}]")]
    return []


@pytest.mark.slow
def test_kserve_inferenceservice_validates_against_its_crd():


    schema = _kserve_schema()
    (isvc,) = _yaml_docs(ROOT / "docker" / "k8s" / "kserve" / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    jsonschema.validate(isvc, schema)
    assert _unknown_fields(isvc, schema) == []
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "triton"
    # the checks do catch mistakes: a misspelt field, a wrongly typed one
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    assert _unknown_fields(typo, schema) == [".spec.predictor.model.storageURI"]
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    try:
        jsonschema.validate(wrong, schema)
        raise AssertionError("minReplicas as a string passed the schema")
    except jsonschema.ValidationError as e:
        assert "minReplicas" in str(e.path) or "one" in e.message


def test_kserve_reads_the_private_bucket_with_a_service_accounts_secret():
    """KServe's storage initializer takes S3 credentials only from the InferenceService's ServiceAccount's
    secrets (with the endpoint in their serving.kserve.io annotations)."""
    (isvc,) = _yaml_docs(ROOT / "docker" / "k8s" / "kserve" / "inferenceservice.yaml")
    creds = {d["kind"]: d for d in _yaml_docs(ROOT / "docker" / "k8s" / "kserve" / "s3-credentials.yaml")}
    account = creds["ServiceAccount"]
    assert isvc["spec"]["predictor"]["serviceAccountName"] == account["metadata"]["name"]
    secret = creds["Secret"]
    assert {"name": secret["metadata"]["name"]} in account["secrets"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert "serving.kserve.io/s3-endpoint" in secret["metadata"]["annotations"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"].startswith("s3://")
    validate = str(Path(sys.executable).parent / "kubernetes-validate")
    path = str(ROOT / "docker" / "k8s" / "kserve" / "s3-credentials.yaml")
    r = subprocess.run([validate, "--strict", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_repository_has_no_python_model_after_the_guard(onnx_model, tmp_path):
    """The GPU target's request path is guard -> DALI backend -> TensorRT: the softmax is in the exported graph
    and the top-k come from Triton's classification extension, labelled from the classifier's labels.txt; the
    one Python model checks the bytes before DALI (served/models/guard.py)."""

    repo = tmp_path / "gpu"
    (repo / P.POSTPROCESS / "1").mkdir(parents=True)  # left by an earlier render with a postprocess model
    render(onnx_model, repo, RepoSettings(max_batch_size=8), target="gpu")
    configs = read_configs(repo)
    check_ensemble(configs)
    assert sorted(configs) == sorted([P.ENSEMBLE, P.GUARD, P.PREPROCESS, P.CLASSIFIER])
    assert not (repo / P.POSTPROCESS).exists()
    assert [c.backend for c in configs.values() if c.backend] == ["python", "dali"]
    assert [p.parent.parent.name for p in repo.rglob("model.py")] == [P.GUARD]
    probs = next(o for o in configs[P.CLASSIFIER].output if o.name == "probabilities")
    assert probs.label_filename == "labels.txt"
    assert (repo / P.CLASSIFIER / "labels.txt").read_text().splitlines() == list(read_metadata(onnx_model).classes)
    assert [o.name for o in configs[P.ENSEMBLE].output] == [P.PROBABILITIES]


@pytest.mark.parametrize("layout", ["classification", "postprocess"])
def test_gpu_path_refuses_oversized_images_before_dali(onnx_model, tmp_path, layout):
    """Issue 37: DALI decodes whatever reaches it, and a decode error fails its whole batch, so on the GPU target
    the ensemble's first step is the guard, with the repository's limits. The guard itself runs here, on the
    real server's Python backend (the steps after it need a GPU): a small PNG declaring 3 MP over a 1 MP limit
    and a file that is no image are refused with the embedded target's messages, each request on its own,
    while a real photograph sent beside them passes on byte for byte."""
    from PIL import Image
    from skimage import data as skdata
    from tritonclient import http as httpclient
    from tritonclient.utils import InferenceServerException

    from serve.server import TritonServer

    limit = 1_000_000
    repo = tmp_path / "gpu"
    render(onnx_model, repo, RepoSettings(max_batch_size=8, max_image_pixels=limit), target="gpu", layout=layout)
    ensemble_steps = read_configs(repo)[P.ENSEMBLE].ensemble_scheduling.step
    assert [s.model_name for s in ensemble_steps[:2]] == [P.GUARD, P.PREPROCESS]
    assert dict(ensemble_steps[1].input_map) == {P.IMAGE: ensemble_steps[0].output_map[P.CHECKED]}

    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buf, "JPEG", quality=90)
    photo = buf.getvalue()
    buf = io.BytesIO()
    Image.new("L", (2_000, 1_500)).save(buf, "PNG")  # 3 MP of one colour: a few kB
    bomb = buf.getvalue()
    assert len(bomb) < 20_000

    alone = tmp_path / "alone"
    shutil.copytree(repo / P.GUARD, alone / P.GUARD)
    with TritonServer(alone, None) as server, \
            httpclient.InferenceServerClient(server.http_url, concurrency=3, network_timeout=120) as client:
        def request(images: list[bytes]):
            width = max(map(len, images))
            rows = np.zeros((len(images), width), np.uint8)
            for i, image in enumerate(images):
                rows[i, :len(image)] = np.frombuffer(image, np.uint8)
            tensor = httpclient.InferInput(P.IMAGE, list(rows.shape), "UINT8")
            tensor.set_data_from_numpy(rows)
            return client.async_infer(P.GUARD, [tensor]), rows

        sent = [request([photo]), request([photo, bomb]), request([b"GIF89a not served"]), request([photo, photo])]
        outcomes = []
        for pending, rows in sent:
            try:
                outcomes.append((pending.get_result(timeout=120).as_numpy(P.CHECKED), rows))
            except InferenceServerException as e:
                outcomes.append((e.message(), rows))
    (first, rows0), (refused, _), (not_image, _), (pair, rows3) = outcomes
    assert np.array_equal(first, rows0)
    assert np.array_equal(pair, rows3)
    assert f"image 1 of 2: image is 2000x1500 = 3000000 pixels, over the limit of {limit} pixels" in refused
    assert "image 0 of 1: not a JPEG or PNG image" in not_image


def test_classification_layout_serves_what_the_postprocess_layout_serves(onnx_model, server, val_files, tmp_path):
    """The no-Python-after-the-classifier layout, verified on the embedded server: HTTP and gRPC clients get
    the same labels, scores and probabilities as from the session server's postprocess layout, the command
    line works unchanged, and a bad image still fails alone."""



    repo = tmp_path / "classification"
    render(onnx_model, repo, RepoSettings(max_batch_size=MAX_BATCH), layout="classification")
    assert not (repo / P.POSTPROCESS).exists()
    files = val_files[:12]
    with ImageClassifierClient(server.http_url, "http", with_probabilities=True) as c:
        reference = c.classify_files(files, batch_size=5)
    with TritonServer(repo, None, log_file=tmp_path / "server.log") as s:
        for protocol, url in (("http", s.http_url), ("grpc", s.grpc_url)):
            with ImageClassifierClient(url, protocol, top_k=3, with_probabilities=True) as c:
                got = c.classify_files(files, batch_size=5)
                asynchronous = c.classify_async([f.read_bytes() for f in files], [str(f) for f in files], batch_size=4)
            for a, b in zip(got, reference, strict=True):
                assert a.ok, (protocol, a, b)
                assert a.labels == b.labels[:3], (protocol, a, b)
                np.testing.assert_allclose(a.scores, b.scores[:3], atol=2e-6)  # printed with 6 decimals
                np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-6)
            assert [p.labels for p in asynchronous] == [p.labels for p in got]
        with ImageClassifierClient(s.grpc_url, "grpc", top_k=2) as c:
            mixed = c.classify([files[0].read_bytes(), b"\xff\xd8\xff\xe0 not a jpeg", files[1].read_bytes()],
                               ["good0", "bad", "good1"], batch_size=3)
        assert [p.ok for p in mixed] == [True, False, True]
        assert len(mixed[0].labels) == 2
        assert "JPEG" in mixed[1].error
        r = subprocess.run([sys.executable, "-m", "clients", str(files[0]), "--url", s.http_url, "--top-k", "2",
                            "--json", "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["labels"] == reference[0].labels[:2]


class RecordingConfig:
    """The two IBuilderConfig calls apply_timing_cache makes (TensorRT 10.5's signatures), answering as
    TensorRT does for a cache made elsewhere: set_timing_cache returns False. TensorRT itself needs a GPU;
    this checks what our code does with its answer."""

    def __init__(self, accepts: set[bytes]):
        self.accepts, self.created, self.set = accepts, [], []

    def create_timing_cache(self, data: bytes):
        self.created.append(data)
        return ("cache", data)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.set.append((cache, ignore_mismatch))
        return cache[1] in self.accepts


def test_a_timing_cache_from_another_gpu_or_tensorrt_is_dropped_with_a_note(tmp_path):
    from build.engine import apply_timing_cache

    foreign = tmp_path / "trt_timing.cache"
    foreign.write_bytes(b"made on an A100 with TensorRT 10.3")
    notes: list[str] = []
    config = RecordingConfig(accepts={b""})
    assert apply_timing_cache(config, foreign, notes.append) == ("cache", b"")
    assert config.created == [foreign.read_bytes(), b""]
    assert all(not ignore for _, ignore in config.set)
    assert len(notes) == 1
    assert "another GPU or TensorRT" in notes[0]
    ours = RecordingConfig(accepts={foreign.read_bytes()})
    assert apply_timing_cache(ours, foreign, notes.append) == ("cache", foreign.read_bytes())
    assert len(notes) == 1


def test_the_timing_cache_file_is_keyed_by_gpu_and_tensorrt(tmp_path):
    from build.engine import EngineBuilder

    builder = EngineBuilder(tmp_path / "m.onnx", BatchProfile(), "fp16", timing_cache=tmp_path / "trt_timing.cache")
    builder.trt, builder.cc = types.SimpleNamespace(__version__="10.5.0.18"), "9.0"
    assert builder.cache_path() == tmp_path / "trt_timing-trt10.5.0.18-sm90.cache"
    builder.cc = "8.0"
    assert builder.cache_path() != tmp_path / "trt_timing-trt10.5.0.18-sm90.cache"


def test_the_served_preprocess_model_is_checked_against_the_cpu_pipeline(ensemble_server, onnx_model, tmp_path):
    """`make gpu-check` queries the served preprocess model through Triton (on the GPU target: the DALI
    backend's own DALI and nvJPEG) and compares its pixels with the CPU pipeline on every encoding variant of
    real photos. Here the served preprocess model is the embedded target's (the same DALI on the CPU), so the
    two agree exactly; a server computing other pixels is caught."""
    import dataclasses

    import skimage.data
    from PIL import Image

    from core.metadata import read_metadata
    from perf.checks.gpu_check import decoder_photos, served_decoder_problems, served_preprocess_vs_cpu

    files = []
    for name in ("chelsea", "coffee"):  # real photographs shipped by scikit-image
        files.append(tmp_path / f"{name}.jpg")
        Image.fromarray(getattr(skimage.data, name)()).save(files[-1], quality=92)
    photos = decoder_photos(files, n=2)
    assert {"jpeg_420", "jpeg_422", "jpeg_444", "progressive_jpeg", "progressive_jpeg_444", "exif_orientation_6",
            "exif_orientation_8", "png_16bit"} <= {k.split("/")[1] for k in photos}
    spec = read_metadata(onnx_model).preprocess
    for protocol, url in (("grpc", ensemble_server.grpc_url), ("http", ensemble_server.http_url)):
        check = served_preprocess_vs_cpu(url, protocol, spec, photos)
        assert check["images"] == len(photos), check
        assert served_decoder_problems(check) == [], check
        assert check["max_levels"] < 0.01, check
    # the CPU side with another resize policy stands for a server that computes other pixels
    stretched = served_preprocess_vs_cpu(ensemble_server.grpc_url, "grpc",
                                         dataclasses.replace(spec, resize_policy="stretch"), photos)
    assert len(served_decoder_problems(stretched)) == len(photos)
    # and the check's verdict fails on it (the rest of the engine's entry passing)
    from perf.checks.gpu_check import verdict
    entry = {"gate": "pass", "engine": {"top1": 90.0}, "served_agreement_with_pytorch": 100.0, "images": 8,
             "errors": 0, "served_preprocess_vs_cpu": stretched}
    report = {"dali_gpu_vs_cpu": {"padding_changes_output": False}, "max_top1_drop": 1.0, "pytorch_fp32_top1": 90.0,
              "engines": {"fp16": entry}}
    problems = verdict(report, 99.0)
    assert len(problems) == len(photos)
    assert all(p.startswith("fp16: served preprocess differs") for p in problems)
    assert verdict({**report, "engines": {"fp16": {**entry, "served_preprocess_vs_cpu": check}}}, 99.0) == []


def test_gpu_dali_threads_follow_the_serving_host(onnx_model, tmp_path, capsys):
    """Issue 37: the GPU target's DALI threads do the host side of nvJPEG's decoding; rendered with the embedded
    target's 1 thread per instance, a 32-core GPU host would preprocess on 2 of its cores. `make repo
    TARGET=gpu` sizes them for the serving host (HOST_CORES, default this machine's), fitted again at each
    render, unless DALI_THREADS pins them."""
    from build import render_repo

    def rendered(repo: Path, *flags: str) -> tuple[str, int]:
        render_repo.main(render_repo.get_args_parser().parse_args(
            ["--onnx", str(onnx_model), "--target", "gpu", "--out", str(repo), *flags]))
        config = read_configs(repo)[P.PREPROCESS]
        pipeline = json.loads((repo / P.PREPROCESS / "1" / PIPELINE_CONFIG).read_text())
        return config.parameters["num_threads"].string_value, pipeline["num_threads"]

    assert rendered(tmp_path / "a", "--host-cores", "32") == ("16", 16)  # 2 instances sharing 32 cores
    assert re.search(r"dali_threads +16 +fitted \(2 DALI instances sharing a serving host of 32 cores",
                     capsys.readouterr().out)
    assert rendered(tmp_path / "b", "--host-cores", "32", "--preprocess-instances", "4") == ("8", 8)
    assert rendered(tmp_path / "c", "--host-cores", "32", "--dali-threads", "3") == ("3", 3)  # given: pinned
    assert rendered(tmp_path / "c", "--host-cores", "8") == ("3", 3)  # and kept
    assert rendered(tmp_path / "a", "--host-cores", "4") == ("2", 2)  # fitted again for another host


def test_gpu_check_reports_the_host_side_against_the_tensor_path():
    """Issue 37: `make gpu-check` says how the JPEG path's best throughput compares with the classifier's alone,
    with the DALI threads and cores it ran with, so a host-side preprocessing bottleneck shows."""
    from perf.checks.gpu_check import host_side, host_side_line

    rows = [{"source": "jpeg", "concurrency": c, "images_per_s": v} for c, v in ((4, 900.0), (16, 1200.0))]
    rows += [{"source": "tensors", "concurrency": c, "images_per_s": v} for c, v in ((4, 2000.0), (16, 4800.0))]
    h = host_side(rows, RepoSettings(dali_threads=8, preprocess_instances=2), cores=16)
    assert h["jpeg_over_tensors"] == pytest.approx(0.25)
    line = host_side_line("fp16", h)
    assert "JPEG path 1200 img/s at its best concurrency, 0.25 of the tensor path's 4800" in line
    assert "DALI 8 threads x 2 instances on 16 cores" in line
    assert host_side([r for r in rows if r["source"] == "jpeg"], RepoSettings(), 2)["jpeg_over_tensors"] is None
