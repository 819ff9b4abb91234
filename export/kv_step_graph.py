"""The block-causal step with an in-place self-attention cache: ``generator_step_kv.onnx``, derived at build time.

Where TensorRT's ONNX parser has ``TensorScatter`` (TensorRT >= 10.15, where it becomes an
``IKVCacheUpdateLayer``), the build derives ``generator_step_kv.onnx`` from ``generator_step.onnx``:
``past_key_values.{j}.key/value`` become preallocated caches [rows, H, L, c], each ``Concat(past, new)``
becomes ``TensorScatter(cache, new, write_indices)`` (opset 24) whose output ``present.{j}.*`` TensorRT
aliases to the cache input (one device buffer, updated in place), and every self-attention softmax gets
a key mask ``position < write_index + tokens`` (keys past the scale are stale or zero). It shares the
weight file of ``generator_step`` and is checked against it with onnxruntime (tests/test_tensorrt.py).
The standard ``TensorScatter`` is used rather than TensorRT's ``TRT_KVCacheUpdate`` custom op: the parser
maps both to the same layer, and onnxruntime runs the standard one, so the variant is checked on CPU.
"""

from __future__ import annotations

import dataclasses

from mindhier_rt.bundle import Bundle, GraphSpec, Manifest, TensorSpec
from mindhier_rt.bundle import tensor_names as tn
from mindhier_rt.errors import ConfigError
from mindhier_rt.export.attention_plugin import load_graph_structure

KV_OPSET = 24  # TensorScatter is an opset-24 operator


def kv_graph_entry(manifest: Manifest, file: str = f"{tn.KV_STEP_GRAPH}.onnx") -> GraphSpec:
    """Manifest entry of ``generator_step_kv``: the step's inputs and outputs with full-length caches."""
    step = manifest.graphs[tn.STEP_GRAPH]
    total = sum(s.tokens for s in manifest.scales)

    def full_length(spec: TensorSpec) -> TensorSpec:
        return dataclasses.replace(spec, shape=(*spec.shape[:2], total, *spec.shape[3:]))

    inputs = [full_length(s) if s.name.startswith(tn.PAST_PREFIX) else s for s in step.inputs]
    inputs.append(TensorSpec(tn.WRITE_INDICES, "int64", ("rows",)))
    outputs = [full_length(s) if s.name.startswith(tn.PRESENT_PREFIX) else s for s in step.outputs]
    return GraphSpec(
        name=tn.KV_STEP_GRAPH,
        file=file,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        external_data=step.external_data,  # the same weight file: stored once
        extra={"derived_from": tn.STEP_GRAPH, "opset": KV_OPSET},
    )


def derive_kv_step_graph(bundle: Bundle, out_name: str = f"{tn.KV_STEP_GRAPH}.onnx") -> GraphSpec:
    """Write ``generator_step_kv.onnx`` (in-place cache variant, see the module docstring); return its entry.

    Pure ONNX surgery on the exported concat graph, so the variant cannot drift from it; the weights are
    not loaded or copied (the variant references ``generator_step``'s initializers and weight file).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    from mindhier_rt.export.checks import FORBIDDEN_OPS, TENSORRT_ONNX_OPS, GraphCheckError, op_counts

    manifest = bundle.spec
    step = manifest.graphs[tn.STEP_GRAPH]
    if not any(s.name.startswith(tn.PAST_PREFIX) for s in step.inputs):
        raise ConfigError("the in-place cache variant is for block-causal bundles; this one is scale-local")
    total = sum(s.tokens for s in manifest.scales)
    model = load_graph_structure(bundle, step.file)
    model = version_converter.convert_version(model, KV_OPSET)
    graph = model.graph

    def set_seq_len(value_info) -> None:
        dim = value_info.type.tensor_type.shape.dim[2]
        dim.Clear()
        dim.dim_value = total

    caches = [vi for vi in graph.input if vi.name.startswith(tn.PAST_PREFIX)]
    for vi in caches:
        set_seq_len(vi)
    for vo in graph.output:
        if vo.name.startswith(tn.PRESENT_PREFIX):
            set_seq_len(vo)
    graph.input.append(helper.make_tensor_value_info(tn.WRITE_INDICES, TensorProto.INT64, ["rows"]))
    elem = caches[0].type.tensor_type.elem_type
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)

    # key mask, one for all layers: bias[r, 0, 0, s] = 0 if s < write_indices[r] + tokens else -inf
    mask_nodes = [
        helper.make_node("Shape", [tn.H], ["kv_mask.tokens"], start=1, end=2),
        helper.make_node("Add", [tn.WRITE_INDICES, "kv_mask.tokens"], ["kv_mask.end"]),
        helper.make_node("Unsqueeze", ["kv_mask.end", "kv_mask.axis_1"], ["kv_mask.end_r1"]),
        helper.make_node("Less", ["kv_mask.positions", "kv_mask.end_r1"], ["kv_mask.visible"]),
        helper.make_node("Where", ["kv_mask.visible", "kv_mask.zero", "kv_mask.minus_inf"], ["kv_mask.bias_rS"]),
        helper.make_node("Unsqueeze", ["kv_mask.bias_rS", "kv_mask.axes_1_2"], ["kv_mask.bias"]),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), "kv_mask.axis_1"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "kv_mask.axes_1_2"),
            numpy_helper.from_array(np.arange(total, dtype=np.int64)[None, :], "kv_mask.positions"),
            numpy_helper.from_array(np.array(0, np_dtype), "kv_mask.zero"),
            numpy_helper.from_array(np.array(-np.inf, np_dtype), "kv_mask.minus_inf"),
        ]
    )
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def softmax_after(tensor: str, hops: int = 6):
        frontier = [tensor]
        for _ in range(hops):
            nxt = []
            for t in frontier:
                for node in consumers.get(t, []):
                    if node.op_type == "Softmax":
                        return node
                    nxt.extend(node.output)
            frontier = nxt
        return None

    nodes, masked, updates = [], set(), 0
    for node in graph.node:
        if node.op_type == "Concat" and node.input and node.input[0].startswith(tn.PAST_PREFIX):
            if len(node.input) != 2 or not node.output[0].startswith(tn.PRESENT_PREFIX):
                raise GraphCheckError(f"{step['file']}: unexpected cache concat {node.name}")
            scatter = helper.make_node(
                "TensorScatter", [node.input[0], node.input[1], tn.WRITE_INDICES], list(node.output),
                name=f"kv_update.{node.output[0].removeprefix(tn.PRESENT_PREFIX)}", axis=-2, mode="linear",
            )  # fmt: skip
            nodes.append(scatter)
            updates += 1
            if node.output[0].endswith(".key"):
                softmax = softmax_after(node.output[0])
                if softmax is None:
                    raise GraphCheckError(f"{step['file']}: no softmax after {node.output[0]}")
                masked.add(softmax.output[0])
            continue
        if node.op_type == "Softmax" and node.output[0] in masked:
            scores = node.input[0]
            nodes.append(helper.make_node("Add", [scores, "kv_mask.bias"], [f"{scores}.kv_masked"]))
            node.input[0] = f"{scores}.kv_masked"
        nodes.append(node)
    if updates != len(caches) or len(masked) != len(caches) // 2:
        raise GraphCheckError(
            f"{step['file']}: expected {len(caches)} cache concats and {len(caches) // 2} self-attention softmaxes, "
            f"found {updates} and {len(masked)}"
        )
    del graph.node[:]
    graph.node.extend(mask_nodes + nodes)
    out = bundle.path(out_name)
    onnx.save(model, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as e:
        raise GraphCheckError(f"{out_name}: ONNX checker failed: {str(e).splitlines()[0]}") from e
    bad = sorted(op for op in op_counts(out) if op not in TENSORRT_ONNX_OPS | {"TensorScatter"} or op in FORBIDDEN_OPS)
    if bad:
        raise GraphCheckError(f"{out_name}: operators TensorRT's ONNX parser cannot import: {', '.join(bad)}")
    return kv_graph_entry(manifest, out_name)
