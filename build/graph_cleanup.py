"""onnx-graphsurgeon clean-up: constant folding, dead and identity node removal, topological sort; and a batch
fixed inside a graph made dynamic where the graph shows it is the batch (:func:`unfix_batch`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def remove_identities(graph) -> int:
    """Bypass Identity nodes (rewire their consumers to the Identity's input); returns how many."""
    outputs = {t.name for t in graph.outputs}
    count = 0
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        src, dst = node.inputs[0], node.outputs[0]
        if dst.name in outputs:  # a graph output keeps its name; leave that Identity alone
            continue
        for consumer in list(dst.outputs):
            consumer.inputs = [src if t is dst else t for t in consumer.inputs]
        node.outputs.clear()
        count += 1
    return count


def clean(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The cleaned model and a log of node counts before/after; metadata_props are kept."""
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    identities = remove_identities(graph)
    graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    onnx.helper.set_model_props(cleaned, {p.key: p.value for p in model.metadata_props})
    return cleaned, {"nodes_before": before, "nodes_after": len(cleaned.graph.node), "identities_removed": identities}


# The symbolic batch dimension's name in a graph whose batch is dynamic (build.import_onnx writes it too)
BATCH_DIM = "batch"


def _fixed_values(tensor: Any) -> np.ndarray | None:
    """A tensor's values where the graph fixes them (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    producers = tensor.inputs
    if len(producers) == 1 and producers[0].op == "Constant" and isinstance(producers[0].attrs.get("value"),
                                                                               gs.Constant):
        return np.asarray(producers[0].attrs["value"].values)
    return None


def _inferred_shapes(graph: gs.Graph) -> dict[str, list[int | str | None]]:
    """Every tensor's shape as ONNX shape inference sees it: an int, a symbol's name, or None (unknown)."""
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph))
    shapes = {}
    for v in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
    return shapes


def _batch_following_target(node: gs.Node, shapes: dict[str, list[int | str | None]], batch: int
                            ) -> np.ndarray | None:
    """For a Reshape whose fixed target shape starts with the fixed ``batch`` where its data's first dimension
    is the batch (the symbol, as inferred) and the target's other entries take exactly the data's other, static
    dimensions: that target as [-1, the other entries resolved], which keeps each image's row its own at any
    batch (a row-major reshape that keeps the first dimension moves no element to another row). None for any
    other node."""
    if node.op != "Reshape":
        return None
    target = _fixed_values(node.inputs[1])
    data = shapes.get(node.inputs[0].name)
    if target is None or target.ndim != 1 or not len(target) or int(target[0]) != batch or not data:
        return None
    per_image = [d for d in data[1:] if isinstance(d, int) and d > 0]
    if data[0] != BATCH_DIM or len(per_image) != len(data) - 1:  # only static dimensions can be counted
        return None
    rest = [int(v) for v in target[1:]]
    if not node.attrs.get("allowzero", 0):  # 0 copies the data's dimension there (with allowzero it is empty)
        rest = [per_image[i] if v == 0 and i < len(per_image) else v for i, v in enumerate(rest)]
    if any(v < -1 or v == 0 for v in rest) or rest.count(-1) > 1:
        return None
    size, known = math.prod(per_image), math.prod(v for v in rest if v != -1)
    if -1 in rest and size % known == 0:
        rest[rest.index(-1)] = size // known
    return np.array([-1, *rest], dtype=target.dtype) if math.prod(rest) == size else None


def unfix_batch(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with its input's and outputs' first dimension made the symbol :data:`BATCH_DIM`, and each
    Reshape that writes the fixed ``batch`` where its data's first dimension provably is the batch made to follow
    it instead (-1 there); and the outputs of the Reshapes rewritten. Other places a graph may fix its batch (Expand,
    Tile, a Reshape that mixes the batch with other dimensions) are left as they are: the caller proves the
    result by running it (build.import_onnx), and serves the fixed batch where the proof fails."""
    graph = gs.import_onnx(model)
    inp = graph.inputs[0]
    inp.shape = [BATCH_DIM, *inp.shape[1:]]
    for t in graph.tensors().values():  # shapes recorded for the fixed batch: inferred again below
        if isinstance(t, gs.Variable) and t is not inp:
            t.shape = [BATCH_DIM, *t.shape[1:]] if t in graph.outputs and t.shape else None
    rewritten: list[str] = []
    while True:  # a rewritten Reshape passes the batch on: the Reshapes after it are seen in the next round
        shapes = _inferred_shapes(graph)
        found = [(n, t) for n in graph.nodes if (t := _batch_following_target(n, shapes, batch)) is not None]
        if not found:
            break
        for node, target in found:
            node.inputs[1] = gs.Constant(f"{node.outputs[0].name}_shape_following_the_batch", target)
            rewritten.append(node.outputs[0].name)
    graph.cleanup()
    unfixed = gs.export_onnx(graph)
    unfixed.ir_version = model.ir_version
    return unfixed, rewritten
