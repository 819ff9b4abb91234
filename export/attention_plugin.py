"""The step graph's attention as a TensorRT plugin that runs the Triton kernel (``build --attention-plugin``).

Every attention of a decode step is one range: a scale's queries over all of its own scale (scale-local), all
of the context segment of the scale (cross) or the whole cache up to the scale (block-causal). The kernel for
that is ``kernels.scale_attention``'s single-range kernel. This module puts it into the engines:

1. ``derive_plugin_graph`` rewrites a copy of the step graph: each unmasked attention the exporter wrote,
   ``MatMul(q, Transpose(k)) -> Mul(scale) -> Softmax -> MatMul(., v)``, becomes one node
   ``single_range_attention(q, k, v)`` (domain and ``plugin_namespace`` ``mindhier``, attributes ``scale`` and
   ``head_dim``), which TensorRT's ONNX parser hands to the plugin registered under that name and namespace.
   The variant references the step's weight file (nothing is copied). Self-attention of the in-place cache
   variant is masked (keys past the scale are stale) and keeps its MatMul/Softmax form; its cross-attention
   is rewritten.
2. ``register_plugin`` registers ``mindhier::single_range_attention`` with TensorRT's Python plugin API
   (``tensorrt.plugin``, TensorRT >= 10.8) as an ahead-of-time plugin: at build time its ``aot_impl``
   compiles the kernel to PTX for the build GPU (``compile_single_range``) and returns the launch parameters
   as expressions of the input shapes, grid (ceil(Lq / BLOCK_M), B * H), and the kernel's integer arguments
   (heads, Lq, Lk). The plan embeds the PTX, so engines run without Python or Triton, C++ hosts included.

The plain ONNX attention stays the default: the plugin is a build option. What has and has not been checked of
it is recorded in ``benchmarks/results/tensorrt_attention_plugin_checks.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mindhier_rt.bundle import Bundle, GraphSpec
from mindhier_rt.errors import BackendError, ConfigError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = "mindhier"
PLUGIN_NAME = "single_range_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_SUFFIX = "_attention_plugin"
TENSORRT_PLUGIN_API = (10, 8)  # tensorrt.plugin with aot_impl


def plugin_graph_file(graph: str) -> str:
    return f"{graph}{PLUGIN_SUFFIX}.onnx"


def _constant_scalar(graph, name: str) -> float | None:
    """The value of a scalar initializer or Constant node output, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init)
            return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    return None


def find_attentions(graph) -> list[dict[str, Any]]:
    """Every unmasked ``MatMul(q, Transpose(k)) -> Mul(scale) -> Softmax -> MatMul(., v)`` chain of a graph.

    Returns one dict per chain: q, k, v (tensor names; k before its transpose), out, scale and the nodes.
    """
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    found = []
    for softmax in graph.node:
        if softmax.op_type != "Softmax":
            continue
        mul = producer.get(softmax.input[0])
        if mul is None or mul.op_type != "Mul":
            continue  # masked (an Add before the softmax) or another pattern: left as it is
        scores = next((producer[x] for x in mul.input if x in producer and producer[x].op_type == "MatMul"), None)
        if scores is None:
            continue
        scale = next((_constant_scalar(graph, x) for x in mul.input if x != scores.output[0]), None)
        transpose = producer.get(scores.input[1])
        if scale is None or transpose is None or transpose.op_type != "Transpose":
            continue
        if next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None) != [0, 1, 3, 2]:
            continue
        users = consumers.get(softmax.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
            continue
        if any(len(consumers.get(t, [])) != 1 for t in (scores.output[0], mul.output[0])):
            continue  # an intermediate used elsewhere: not a plain attention
        nodes = [scores, mul, softmax, users[0]]
        if len(consumers.get(transpose.output[0], [])) == 1:
            nodes.append(transpose)  # the key transpose goes too unless something else reads it
        found.append(
            {"q": scores.input[0], "k": transpose.input[0], "v": users[0].input[1], "out": users[0].output[0],
             "scale": scale, "nodes": nodes}
        )  # fmt: skip
    return found


def load_graph_structure(bundle: Bundle, rel: str) -> onnx.ModelProto:
    """The ONNX model ``rel`` without its external weights: from the bundle's checked bytes when the manifest lists
    it, else (a graph this build derived a moment ago, listed when the build rewrites the manifest) from disk."""
    import onnx

    if rel in bundle.spec.files:
        return onnx.load_from_string(bundle.read_bytes(rel))
    return onnx.load(str(bundle.path(rel)), load_external_data=False)


def derive_plugin_graph(bundle: Bundle, entry: GraphSpec, head_dim: int) -> Path:
    """Write ``<graph>_attention_plugin.onnx`` next to the graph's ONNX with its attentions as plugin nodes
    (``entry``: the graph, also one this build derived and has not recorded yet).

    Returns the path. Raises ConfigError when the graph has no attention to rewrite.
    """
    import onnx
    from onnx import helper

    from mindhier_rt.export.checks import GraphCheckError

    model = load_graph_structure(bundle, entry.file)
    g = model.graph
    chains = find_attentions(g)
    if not chains:
        raise ConfigError(f"{entry.file}: no unmasked attention to run as the plugin")
    drop = {id(node) for chain in chains for node in chain["nodes"]}
    first_of = {id(chain["nodes"][0]): chain for chain in chains}
    nodes = []
    for node in g.node:
        chain = first_of.get(id(node))
        if chain is not None:
            plugin = helper.make_node(
                PLUGIN_NAME, [chain["q"], chain["k"], chain["v"]], [chain["out"]],
                name=f"{PLUGIN_NAME}.{len(nodes)}", domain=PLUGIN_NAMESPACE,
                plugin_namespace=PLUGIN_NAMESPACE, plugin_version="1",
                scale=float(chain["scale"]), head_dim=int(head_dim),
            )  # fmt: skip
            nodes.append(plugin)
        elif id(node) not in drop:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid(PLUGIN_NAMESPACE, 1))
    out = bundle.path(plugin_graph_file(entry.name))
    onnx.save(model, str(out))
    try:  # the plugin's domain has no schema: check the structure, not the custom node
        onnx.checker.check_model(str(out), full_check=False)
    except onnx.checker.ValidationError as e:
        raise GraphCheckError(f"{out.name}: ONNX checker failed: {str(e).splitlines()[0]}") from e
    log.info("%s: %d attention(s) -> %s", out.name, len(chains), PLUGIN_ID)
    return out


# ---- the TensorRT plugin ---------------------------------------------------------------------------------
_REGISTERED = False


def register_plugin(capability: tuple[int, int]) -> None:
    """Register ``mindhier::single_range_attention`` with ``tensorrt.plugin`` (once per process).

    ``capability``: the build GPU's compute capability, which the PTX is compiled for.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise BackendError(
            f"--attention-plugin needs TensorRT >= {'.'.join(map(str, TENSORRT_PLUGIN_API))} with its Python "
            f"plugin API (tensorrt.plugin): {e}"
        ) from e
    import torch

    from mindhier_rt.kernels.scale_attention import compile_single_range

    torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float, head_dim: int):
        return q.like()

    @trtp.aot_impl(PLUGIN_ID)
    def _compile(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        scale: float,
        head_dim: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ):
        if q.dtype not in torch_dtypes:
            raise BackendError(f"{PLUGIN_ID}: unsupported dtype {q.dtype}")
        kernel = compile_single_range(torch_dtypes[q.dtype], int(head_dim), float(scale), capability)
        B, H, Lq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(Lq, kernel.block_m)
        launch.grid_y = B * H
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_bytes
        scalars = trtp.SymIntExprs(3)  # the kernel's (n_heads, len_q, len_k), after the input pointers
        scalars[0] = trtp.SymInt32(H)
        scalars[1] = trtp.SymInt32(Lq)
        scalars[2] = trtp.SymInt32(k.shape_expr[2])
        return kernel.name, kernel.ptx, launch, scalars

    _REGISTERED = True
    log.info("registered the TensorRT plugin %s (PTX for sm_%d%d)", PLUGIN_ID, *capability)
