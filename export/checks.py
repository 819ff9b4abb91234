"""Checks every exported graph must pass: ONNX's full checker and TensorRT-parser compatibility.

``TENSORRT_ONNX_OPS`` is the one list of ONNX operators the TensorRT 10 ONNX parser imports. Source:
the operator support matrix of the ONNX-TensorRT parser, `onnx/onnx-tensorrt`, file
`docs/operators.md` (TensorRT 10.x branch: opsets 9..20; LayerNormalization since TensorRT 8.6,
GroupNormalization since 10.0, Attention since the 10.14 parser update), reduced to the operators
marked "Y". Operators the parser supports but this project's graphs must not contain (control flow:
every shape is static per scale and batch, the loop lives in the host) are in ``FORBIDDEN_OPS``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mindhier_rt.errors import MindhierError

TENSORRT_ONNX_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "Attention",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GroupNormalization",
        "GRU",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "LSTM",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RNN",
        "RoiAlign",
        "Round",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)
FORBIDDEN_OPS = frozenset({"If", "Loop", "Scan"})


class GraphCheckError(MindhierError):
    """An exported graph that fails the ONNX checker or uses operators TensorRT cannot import."""


def op_counts(path: Path) -> Counter:
    """Operator histogram of a graph, including nodes inside local functions."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx"))
    for fn in model.functions:
        counts.update(node.op_type for node in fn.node if node.domain in ("", "ai.onnx"))
    foreign = [f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain not in ("", "ai.onnx")]
    counts.update(foreign)
    return counts


def tensorrt_incompatible(path: Path) -> list[str]:
    """Operators of the graph that are outside the TensorRT parser's set or forbidden here."""
    return sorted(op for op in op_counts(path) if op not in TENSORRT_ONNX_OPS or op in FORBIDDEN_OPS)


def check_graph(path: Path) -> None:
    """ONNX full check (types and shapes inferred) plus the TensorRT operator check; raises GraphCheckError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise GraphCheckError(f"{path.name}: ONNX checker failed: {str(e).splitlines()[0]}") from e
    bad = tensorrt_incompatible(path)
    if bad:
        raise GraphCheckError(f"{path.name}: operators TensorRT's ONNX parser cannot import here: {', '.join(bad)}")
