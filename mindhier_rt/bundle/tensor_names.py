"""Names of the bundle's graphs, graph tensors and tables that the TensorRT side binds by name (Python).

``export/cpp/tensor_names.hpp`` holds the same names for the C++ host; tests/test_cpp_host.py checks that the
two agree. A tensor that sits in several graphs under one name (``f_hat``) is one constant.
"""

from __future__ import annotations

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


def is_step_graph(graph: str) -> bool:
    return graph in (STEP_GRAPH, KV_STEP_GRAPH)
