"""onnx-graphsurgeon clean-up: constant folding, dead and identity node removal, topological sort."""

from __future__ import annotations

import onnx


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
    import onnx_graphsurgeon as gs

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
