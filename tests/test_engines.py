"""The engine registry (served/engines.py): a new engine is one record, and the typed vocabulary reads as the strings
it replaced. Fast: a four-weight ONNX graph, no trained model, no server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from build import quantize, render_repo
from build.artifacts import ARTIFACT_NAMES, CANDIDATES, REPORT, Candidate, fastest, rendered_candidate, served_for
from core.runners import logits_of, make_runner
from perf.reference import ceiling
from served import engines, stages
from served.engines import EngineName, InferencePrecision, Precision, Target

ROOT = Path(__file__).resolve().parent.parent


def tiny_onnx() -> bytes:
    """input [N, 3] -> logits [N, 2]: one MatMul."""
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture
def fake_engine(monkeypatch):
    """ONNX Runtime again, registered under another name in a copy of the registry (gone after the test)."""
    monkeypatch.setattr(engines, "REGISTRY", dict(engines.REGISTRY))
    ort = engines.get(EngineName.ONNXRUNTIME)
    return engines.register(replace(ort, name="fakeort", title="Fake ORT", default=False,
                                    fastest_options={"allow_spinning": False}))


def test_a_new_engine_is_one_registry_entry(fake_engine, tmp_path):
    """Every place that used to branch on the engine's name takes the one record: the candidates, the served
    choice, the served classifier, the scoring runner, quantize's candidates, the ceiling, and every CLI."""
    model, x = tiny_onnx(), np.ones((2, 3), np.float32)
    expected = x @ np.arange(6, dtype=np.float32).reshape(3, 2)
    # the CPU target's candidates: its files at their own precision, named after it (not the default engine)
    assert CANDIDATES["fakeort_fp32"] == Candidate("fakeort", "fp32", "fp32")
    assert {n for n, c in CANDIDATES.items() if c.engine == "fakeort"} == \
        {"fakeort_fp32", "fakeort_fp16", "fakeort_int8", "fakeort_int8_ort"}
    assert quantize.candidates_for({"fp32", "int8"}, ("fakeort",)).keys() == {"fp32", "int8", "fakeort_fp32",
                                                                             "fakeort_int8"}
    # served (served/stages.py) and measured (core/runners.py) by name
    served = stages.make_classifier("fakeort", model, 1, "f32")
    np.testing.assert_allclose(served(x)[0], expected)
    config = {"parameters": {"engine": {"string_value": "fakeort"}, "onnx_file": {"string_value": "m.onnx"}}}
    (tmp_path / "m.onnx").write_bytes(model)
    np.testing.assert_allclose(stages.classifier_from_config(config, tmp_path)(x)[0], expected)
    np.testing.assert_allclose(make_runner("fakeort", model)(x), expected)
    np.testing.assert_allclose(logits_of("fakeort", model, x), expected)
    np.testing.assert_allclose(ceiling.engine_runner(tmp_path / "m.onnx", "fakeort")(x), expected)
    # make repo's choice: the fastest passing candidate, another engine than the default only past the margin
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / ARTIFACT_NAMES["fp32"]).write_bytes(model)
    speeds = {"fp32": 100.0, "fakeort_fp32": 200.0}
    (artifacts / REPORT).write_text(json.dumps({
        "artifacts": {n: {"latency": {"best_images_per_s": s}} for n, s in speeds.items()}, "gate_failures": [],
        "fp32_sha256": hashlib.sha256(model).hexdigest()}))
    report = json.loads((artifacts / REPORT).read_text())
    assert fastest(report, list(speeds)) == "fakeort_fp32"
    assert served_for("fp32", artifacts) == (artifacts / "model.onnx", CANDIDATES["fakeort_fp32"])
    assert served_for("fp32", artifacts, "fakeort")[1].engine == "fakeort"
    args = Namespace(target="embedded", onnx=None, artifacts=artifacts, precision="fp32", engine="fakeort")
    assert render_repo.served_choice(args)[1] == CANDIDATES["fakeort_fp32"]
    assert rendered_candidate({"engine": "fakeort", "inference_precision": "f32"}, artifacts / "model.onnx") == \
        CANDIDATES["fakeort_fp32"]
    # every CLI offers it
    assert render_repo.get_args_parser().parse_args(["--engine", "fakeort"]).engine == "fakeort"
    assert quantize.get_args_parser().parse_args(["--data", "d", "--engines", "fakeort"]).engines == ["fakeort"]
    assert "fakeort" in quantize.get_args_parser().parse_args(["--data", "d"]).engines
    assert ceiling.get_args_parser().parse_args(["--onnx", "m", "--images", "i", "--engine", "fakeort"]).engine == \
        "fakeort"


def test_an_unknown_engine_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"engine must be one of \('onnxruntime', 'openvino'\), got 'tensorrt'"):
        stages.make_classifier("tensorrt", b"")
    with pytest.raises(ValueError, match=r"runner must be one of \('onnxruntime', 'openvino', 'tensorrt', 'pytorch'\)"):
        make_runner("nope", b"")
    with pytest.raises(ValueError, match="ONNX Runtime computes in the ONNX file's own precision, not bf16"):
        stages.make_classifier("onnxruntime", b"", 1, "bf16")
    with pytest.raises(ValueError, match="an engine named 'openvino' is registered already"):
        engines.register(engines.get("openvino"))


def test_the_registry_reproduces_the_tables_it_replaced():
    """The records give exactly the candidates, engines and defaults that were written out by hand before."""
    assert {n: (c.engine, c.artifact, c.precision, c.inference_precision) for n, c in CANDIDATES.items()} == {
        "fp32": ("onnxruntime", "fp32", "fp32", "f32"), "fp16": ("onnxruntime", "fp16", "fp16", "f32"),
        "int8": ("onnxruntime", "int8", "int8", "f32"), "int8_ort": ("onnxruntime", "int8_ort", "int8", "f32"),
        "openvino_fp32": ("openvino", "fp32", "fp32", "f32"), "openvino_bf16": ("openvino", "fp32", "bf16", "bf16"),
        "openvino_int8": ("openvino", "int8", "int8", "f32"),
        "openvino_int8_ort": ("openvino", "int8_ort", "int8", "f32")}
    assert list(CANDIDATES) == ["fp32", "fp16", "int8", "int8_ort", "openvino_fp32", "openvino_bf16", "openvino_int8",
                                "openvino_int8_ort"]
    assert engines.names() == ("onnxruntime", "openvino", "tensorrt", "pytorch")
    assert engines.names(Target.EMBEDDED) == ("onnxruntime", "openvino")
    assert engines.default_for(Target.GPU).name == "tensorrt"
    assert [e.name for e in engines.engines() if e.isolated] == ["openvino"]
    assert engines.with_hint(InferencePrecision.BF16) is engines.get("openvino")


def test_the_vocabulary_is_written_as_the_strings_it_replaced():
    values = [Precision.FP32, InferencePrecision.BF16, Target.EMBEDDED, EngineName.ONNXRUNTIME]
    assert json.dumps(values) == '["fp32", "bf16", "embedded", "onnxruntime"]'
    assert json.dumps({Precision.INT8: CANDIDATES["int8"].engine}) == '{"int8": "onnxruntime"}'
    assert [f"{v}" for v in values] == [str(v) for v in values] == ["fp32", "bf16", "embedded", "onnxruntime"]
    assert Precision.FP16 == "fp16"
    assert "fp16" in (Precision.FP32, Precision.FP16)


def test_the_served_copy_imports_on_its_own(tmp_path):
    """Copied beside a Python-backend model as make repo copies it (the package, as one unit), served.stages
    finds served.engines without the project (a Python with the project's packages, not its folder, on the path)."""
    for name, data in render_repo.package_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    onnx.save(onnx.load_from_string(tiny_onnx()), str(tmp_path / "model.onnx"))
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from served import stages; "
            "assert stages.__file__.startswith(sys.argv[1]), stages.__file__; "
            "assert not {'core', 'build'} & set(sys.modules); "
            "c = stages.classifier_from_config({'parameters': {}}, __import__('pathlib').Path(sys.argv[1])); "
            "print(type(c).__name__, c(np.ones((1, 3), np.float32))[0].tolist())")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["OnnxClassifier", "[[6.0,", "9.0]]"]
