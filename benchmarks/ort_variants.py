"""onnxruntime variants tried on the ``small`` bundle at batch 4 (CPU), and where its time goes.

    python benchmarks/ort_variants.py [--bundle DIR] [--rounds 15]

Everything runs in turns (one call of each variant per round) and reports medians of the rounds after 2 warm-up
calls. Without ``--bundle`` it exports the seed-0 ``small`` models at batch 4 to a temporary folder.

1. Per-operator share of the kernel time (onnxruntime's profiler) of ``generator_step`` at the last scale
   (8 rows: 4 scans, guided) and of ``vq_decoder`` (4 images).
2. ``generator_step`` with static shapes per scale (``add_free_dimension_override_by_name``, which lets
   onnxruntime fuse MatMul + bias into Gemm) against the bundle's symbolic shapes, at scales 3 and 6.
3. ``session.dynamic_block_base = 4`` against the default, step at scale 6 and decoder.
4. GroupNorm + SiLU + 3x3 conv, three times, at 4 x 32 x 128 x 128 (the decoder's last level), in three forms:
   as exported (Reshape, InstanceNormalization, Reshape, Mul, Add), opset-21 GroupNormalization, and statistics
   from GlobalAveragePool of x and x^2 (ops that run in onnxruntime's NCHWc layout).

The "tried and not kept" numbers of ``benchmarks/results/profile_small_cpu.md`` come from this script.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROWS, SCANS = 8, 4
TOKENS = (1, 4, 9, 16, 25, 36, 64)  # small's scales


def session(path: Path | bytes, entries: dict[str, str] | None = None, free_dims: dict[str, int] | None = None,
            profile: str | None = None) -> ort.InferenceSession:  # fmt: skip
    o = ort.SessionOptions()
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in (entries or {}).items():
        o.add_session_config_entry(k, v)
    for k, v in (free_dims or {}).items():
        o.add_free_dimension_override_by_name(k, v)
    if profile:
        o.enable_profiling, o.profile_file_prefix = True, profile
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), o, providers=["CPUExecutionProvider"])


def feeds_for(s: ort.InferenceSession, tokens: int, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in s.get_inputs():
        shape = [d if isinstance(d, int) else (rows if d == "rows" else tokens) for d in i.shape]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def in_turns(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int) -> dict[str, float]:
    """Median ms per run, the sessions taking turns round by round after 2 warm-up runs each."""
    for s in sessions.values():
        s.run(None, feeds)
        s.run(None, feeds)
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def op_shares(path: Path, feeds_of: Callable[[ort.InferenceSession], dict], prefix: str, runs: int = 5) -> str:
    s = session(path, profile=prefix)
    feeds = feeds_of(s)
    for _ in range(2):
        s.run(None, feeds)
    for _ in range(runs):
        s.run(None, feeds)
    total: collections.Counter = collections.Counter()
    for event in json.loads(Path(s.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
    whole = sum(total.values())
    return ", ".join(f"{op} {100 * us / whole:.0f} %" for op, us in total.most_common(8))


def group_norm_chain(kind: str, B: int = 4, C: int = 32, HW: int = 128, G: int = 8) -> bytes:
    """3 x (GroupNorm, SiLU, 3x3 conv) as an ONNX model, the GroupNorm written the ``kind`` way."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.05).astype(np.float32), "w")]
    nodes, x = [], "x"

    def const(name: str, value: np.ndarray) -> str:
        init.append(numpy_helper.from_array(value, name))
        return name

    for i in range(3):
        gamma = rng.standard_normal(C).astype(np.float32)
        beta = rng.standard_normal(C).astype(np.float32)
        if kind == "groupnorm21":
            nodes.append(helper.make_node("GroupNormalization", [x, const(f"g{i}", gamma), const(f"b{i}", beta)],
                                          [f"n{i}"], num_groups=G, epsilon=1e-6))  # fmt: skip
        elif kind == "instancenorm":
            nodes += [
                helper.make_node("Reshape", [x, const(f"s{i}", np.array([B, G, -1], np.int64))], [f"r{i}"]),
                helper.make_node("InstanceNormalization", [f"r{i}", const(f"o{i}", np.ones(G, np.float32)),
                                 const(f"z{i}", np.zeros(G, np.float32))], [f"in{i}"], epsilon=1e-6),
                helper.make_node("Reshape", [f"in{i}", const(f"t{i}", np.array([B, C, HW, HW], np.int64))], [f"u{i}"]),
                helper.make_node("Mul", [f"u{i}", const(f"g{i}", gamma.reshape(C, 1, 1))], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", const(f"b{i}", beta.reshape(C, 1, 1))], [f"n{i}"]),
            ]  # fmt: skip
        else:  # "gap": per-channel E[x], E[x^2] by GlobalAveragePool, group statistics on [B, C, 1, 1]
            g3 = const(f"g3{i}", np.array([B, G, C // G], np.int64))
            c4 = const(f"c4{i}", np.array([B, C, 1, 1], np.int64))
            nodes += [
                helper.make_node("GlobalAveragePool", [x], [f"m1{i}"]),
                helper.make_node("Mul", [x, x], [f"sq{i}"]),
                helper.make_node("GlobalAveragePool", [f"sq{i}"], [f"m2{i}"]),
                helper.make_node("Reshape", [f"m1{i}", g3], [f"m1g{i}"]),
                helper.make_node("Reshape", [f"m2{i}", g3], [f"m2g{i}"]),
                helper.make_node("ReduceMean", [f"m1g{i}", const(f"ax{i}", np.array([2], np.int64))], [f"mu{i}"]),
                helper.make_node("ReduceMean", [f"m2g{i}", f"ax{i}"], [f"ms{i}"]),
                helper.make_node("Mul", [f"mu{i}", f"mu{i}"], [f"mu2{i}"]),
                helper.make_node("Sub", [f"ms{i}", f"mu2{i}"], [f"var{i}"]),
                helper.make_node("Add", [f"var{i}", const(f"eps{i}", np.array(1e-6, np.float32))], [f"ve{i}"]),
                helper.make_node("Sqrt", [f"ve{i}"], [f"sd{i}"]),
                helper.make_node("Reciprocal", [f"sd{i}"], [f"inv{i}"]),
                helper.make_node("Expand", [f"inv{i}", g3], [f"invx{i}"]),
                helper.make_node("Expand", [f"mu{i}", g3], [f"mux{i}"]),
                helper.make_node("Reshape", [f"invx{i}", c4], [f"invc{i}"]),
                helper.make_node("Reshape", [f"mux{i}", c4], [f"muc{i}"]),
                helper.make_node("Mul", [f"invc{i}", const(f"g{i}", gamma.reshape(C, 1, 1))], [f"a{i}"]),
                helper.make_node("Mul", [f"muc{i}", f"a{i}"], [f"mua{i}"]),
                helper.make_node("Sub", [const(f"b{i}", beta.reshape(C, 1, 1)), f"mua{i}"], [f"sh{i}"]),
                helper.make_node("Mul", [x, f"a{i}"], [f"xa{i}"]),
                helper.make_node("Add", [f"xa{i}", f"sh{i}"], [f"n{i}"]),
            ]
        nodes += [
            helper.make_node("Sigmoid", [f"n{i}"], [f"sg{i}"]),
            helper.make_node("Mul", [f"n{i}", f"sg{i}"], [f"act{i}"]),
            helper.make_node("Conv", [f"act{i}", "w"], [f"c{i}"], pads=[1, 1, 1, 1]),
        ]
        x = f"c{i}"
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, C, HW, HW])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [B, C, HW, HW])], init,
    )  # fmt: skip
    opset = 21 if kind == "groupnorm21" else 18
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a bundle of the seed-0 small models exported at batch 4")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mindhier-rt-") as tmp:
        bundle = a.bundle
        if bundle is None:
            from mindhier_rt.config import preset
            from mindhier_rt.export.onnx_export import export_bundle
            from mindhier_rt.models.mindhier import MindHier

            bundle = export_bundle(MindHier.from_config(preset("small"), seed=0), Path(tmp) / "b", batch=SCANS).root
        step, decoder = bundle / "generator_step.onnx", bundle / "vq_decoder.onnx"
        last = TOKENS[-1]

        print("## 1. where onnxruntime's kernel time goes (batch 4)\n")
        print(f"- generator_step, scale 6: {op_shares(step, lambda s: feeds_for(s, last, ROWS), f'{tmp}/p_step')}")
        dec_feeds = {"f_hat": np.random.default_rng(0).standard_normal((SCANS, 16, 8, 8)).astype(np.float32)}
        print(f"- vq_decoder: {op_shares(decoder, lambda s: dec_feeds, f'{tmp}/p_dec')}\n")

        print("## 2. static shapes per scale vs symbolic (generator_step, median ms)\n")
        for scale in (3, 6):
            n = TOKENS[scale]
            pair = {"symbolic": session(step), "static": session(step, free_dims={"rows": ROWS, "tokens": n})}
            r = in_turns(pair, feeds_for(pair["symbolic"], n, ROWS), a.rounds)
            print(f"- scale {scale}: symbolic {r['symbolic']:.2f} ms, static {r['static']:.2f} ms")

        print("\n## 3. session.dynamic_block_base = 4 vs default (median ms)\n")
        for name, path, feeds_of in (("generator_step scale 6", step, lambda s: feeds_for(s, last, ROWS)),
                                     ("vq_decoder", decoder, lambda s: dec_feeds)):  # fmt: skip
            pair = {"default": session(path), "dyn4": session(path, {"session.dynamic_block_base": "4"})}
            r = in_turns(pair, feeds_of(pair["default"]), a.rounds)
            print(f"- {name}: default {r['default']:.2f} ms, dynamic_block_base=4 {r['dyn4']:.2f} ms")

        print("\n## 4. GroupNorm forms, 3 x (GroupNorm, SiLU, conv3x3) at 4 x 32 x 128 x 128 (median ms)\n")
        x = {"x": np.random.default_rng(1).standard_normal((4, 32, 128, 128)).astype(np.float32)}
        sessions = {kind: session(group_norm_chain(kind)) for kind in ("instancenorm", "groupnorm21", "gap")}
        r = in_turns(sessions, x, a.rounds)
        print("- " + ", ".join(f"{k} {v:.2f} ms" for k, v in r.items()))


if __name__ == "__main__":
    main()
