"""Names of the bundle's graphs, graph tensors and tables (Python): the exporter writes them, the onnxruntime and
TensorRT backends and the builder bind by them.

``export/cpp/tensor_names.hpp`` holds the same names for the C++ host; tests/test_cpp_host.py checks that the
two agree. A tensor that sits in several graphs under one name (``f_hat``) is one constant.
"""

from __future__ import annotations

from collections.abc import Callable

# graphs
CONTEXT_GRAPH = "context"
STEP_GRAPH = "generator_step"
KV_STEP_GRAPH = "generator_step_kv"  # the block-causal step with an in-place self-attention cache
DECODER_GRAPH = "vq_decoder"
ENCODER_PREFIX = "encoder_"
UPDATE_PREFIX = "update_"

# encoder_<subject>
VOXELS = "voxels"
POOLED = "pooled"
CONTEXT = "context"  # the encoder's token output and the context step's second input
LABELS = "labels"  # the context step's input for class-conditional models (VAR)

# context step outputs read by every generator step
START = "start"
ADA_BLOCKS = "ada_blocks"
ADA_HEAD = "ada_head"
CROSS_PREFIX = "cross."  # cross.{layer}.key / cross.{layer}.value

# generator step
H = "h"
ROPE_COS = "rope.cos"
ROPE_SIN = "rope.sin"
CROSS_SEGMENT = "cross.segment"  # reference-pipeline context map: the context segment of every query token
PAST_PREFIX = "past_key_values."  # past_key_values.{layer}.key / .value
PRESENT_PREFIX = "present."
WRITE_INDICES = "write_indices"  # in-place cache: where the scale's keys and values are written
LOGITS = "logits"

# update_<i> and the decoder
F_HAT = "f_hat"
IDX = "idx"
F_HAT_NEXT = "f_hat_next"
H_NEXT = "h_next"
IMAGE = "image"

# tables (manifest ``tables`` keys)
ROPE_COS_TABLE = "rope_cos"
ROPE_SIN_TABLE = "rope_sin"
CROSS_SEGMENT_TABLE = "cross_segment"


def encoder_graph(subject: str) -> str:
    return f"{ENCODER_PREFIX}{subject}"


def update_graph(scale: int) -> str:
    return f"{UPDATE_PREFIX}{scale}"


KV = ("key", "value")


def cross_kv(layer: int, kv: str) -> str:
    return f"{CROSS_PREFIX}{layer}.{kv}"


def past_kv(layer: int, kv: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kv}"


def present_kv(layer: int, kv: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kv}"


def per_layer(name: Callable[[int, str], str], depth: int) -> list[str]:
    """Key then value of every layer: the order the graphs take and give them."""
    return [name(j, kv) for j in range(depth) for kv in KV]


def is_step_graph(graph: str) -> bool:
    return graph in (STEP_GRAPH, KV_STEP_GRAPH)
