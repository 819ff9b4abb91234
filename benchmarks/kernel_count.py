"""Kernel launches of one fast-backend decode, per phase, counted on the CPU: PyTorch ops and Triton launches.

    TRITON_INTERPRET=1 python benchmarks/kernel_count.py [--preset mindhier-512] [--out FILE]

On a GPU every phase of the fast backend replays as a CUDA graph, so what bounds the small scales is the number
of kernels in each graph and each kernel's minimum time (about 2 us on an H200), not launch overhead. That number
does not depend on the device, the width or the weights: it is the same structural walk through the model. This
script counts it without a GPU. It builds the preset's structure (depth, number of scales, levels, VQ-VAE
stages) at a tiny width and with scales of 1, 4, 9, ... tokens, decodes one scan with guidance on every scale
through the fast backend (static buffers, Triton attention; no CUDA graphs on the CPU), and counts, per phase:

- PyTorch ops that launch a kernel: every op the dispatcher sees, less the pure view ops (view, transpose,
  slice, ...) that launch nothing on a GPU either;
- Triton kernel launches (run by Triton's interpreter here).

once with the fused norm kernels (the CUDA default) and once without. Counts can differ from a GPU's by the few
ops whose CUDA and CPU implementations split differently (e.g. a fused addmm on one, mm + add on the other).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make a new view of existing memory: no kernel on any device.
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "split",
    "split_with_sizes", "unbind", "as_strided", "alias", "unsqueeze", "squeeze", "detach", "unflatten", "flatten",
    "chunk", "narrow", "view_as", "expand_as", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "dim", "size", "stride", "numel", "is_contiguous",
}  # fmt: skip
PHASES = ("encode", "prepare", "step", "choose_tokens", "update", "decode_image")


class KernelCounter(TorchDispatchMode):
    """Counts the dispatched ops that launch kernels, by phase; paused inside Triton launches (the interpreter
    moves tensors around with PyTorch ops of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.paused = 0
        self.torch_ops: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.names: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if not self.paused and name not in VIEW_OPS:
            self.torch_ops[self.phase] += 1
            self.names[(self.phase, name)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_triton(counter: KernelCounter) -> Iterator[None]:
    """Inside: the interpreter's launch counts each Triton kernel once and its internals not at all."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter.triton[counter.phase] += 1
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def narrow_config(name: str) -> Any:
    """The preset's structure at a tiny width: same depth, schedule, levels, heads' split and VQ-VAE stages."""
    from mindhier_rt.config import preset

    cfg = preset(name)
    g = dataclasses.replace(cfg.generator, width=64, heads=2)
    enc = cfg.encoder and dataclasses.replace(
        cfg.encoder, subjects=(("subj01", 64),), mlp_dims=(32,) * len(cfg.encoder.mlp_dims), heads=2, ffn_dim=64
    )
    vq = dataclasses.replace(cfg.vqvae, ch=8, norm_groups=4)
    # as many scales, of 1, 4, 9, ... tokens: the kernels per scale do not depend on its token count
    patch_nums = tuple(range(1, len(cfg.patch_nums) + 1))
    return dataclasses.replace(
        cfg, generator=g, encoder=enc, vqvae=vq, context_dim=32, vocab_size=64, latent_dim=8,
        patch_nums=patch_nums, image_size=patch_nums[-1] * vq.downsample,
    )  # fmt: skip


def count_decode(cfg: Any, fused: bool, counter: KernelCounter) -> dict[str, dict[str, int]]:
    from mindhier_rt.models.mindhier import MindHier
    from mindhier_rt.pipeline import reconstruct
    from mindhier_rt.runtime.torch_fast import FastTorchBackend
    from mindhier_rt.sampling import SamplingConfig

    models = MindHier.from_config(cfg, seed=0)
    backend = FastTorchBackend(copy.deepcopy(models), device="cpu", attention="triton", fused=fused)
    for phase in PHASES:
        method = getattr(backend, phase)

        def timed(*args: Any, _method: Any = method, _phase: str = phase) -> Any:
            counter.phase = _phase
            try:
                return _method(*args)
            finally:
                counter.phase = "other"

        setattr(backend, phase, timed)
    subject = cfg.encoder.subjects[0][0]
    voxels = torch.randn(1, cfg.encoder.voxel_count(subject))
    counter.torch_ops.clear(), counter.triton.clear(), counter.names.clear()
    with counter:
        reconstruct(backend, voxels, subject, SamplingConfig(cfg_scale=4.0, seed=0))
    return {"torch": dict(counter.torch_ops), "triton": dict(counter.triton)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mindhier-512")
    p.add_argument("--out", default=None, help="write the markdown table here")
    a = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the Triton kernels run in the interpreter on the CPU)")
    cfg = narrow_config(a.preset)
    counter = KernelCounter()
    with counting_triton(counter):
        result = {fused: count_decode(cfg, fused, counter) for fused in (False, True)}
    per_step_names = {n: c for (ph, n), c in counter.names.items() if ph == "step"}  # of the last (fused) run

    n_scales, depth = cfg.schedule.n_scales, cfg.generator.depth
    lines = [
        f"# Kernel launches of one decode, fast backend, `{a.preset}` structure ({depth} blocks, {n_scales} scales),"
        " 1 scan, guidance on every scale",
        "",
        f"Command: `TRITON_INTERPRET=1 python benchmarks/kernel_count.py --preset {a.preset}`",
        "",
        "| phase | unfused: torch ops | fused: torch ops | fused: Triton launches | fused: total |",
        "|---|---|---|---|---|",
    ]
    totals = [0, 0, 0]
    for phase in PHASES:
        unfused = result[False]["torch"].get(phase, 0) + result[False]["triton"].get(phase, 0)
        t_ops, tr = result[True]["torch"].get(phase, 0), result[True]["triton"].get(phase, 0)
        totals = [totals[0] + unfused, totals[1] + t_ops, totals[2] + tr]
        lines.append(f"| {phase} | {unfused} | {t_ops} | {tr} | {t_ops + tr} |")
    lines.append(f"| **all** | {totals[0]} | {totals[1]} | {totals[2]} | {totals[1] + totals[2]} |")
    steps = result[True]["torch"].get("step", 0) + result[True]["triton"].get("step", 0)
    unfused_steps = result[False]["torch"].get("step", 0) + result[False]["triton"].get("step", 0)
    lines += [
        "",
        f"Per generator step: {unfused_steps / n_scales:.0f} kernels unfused, {steps / n_scales:.0f} fused"
        f" ({steps / n_scales / depth:.1f} per block).",
        "(The unfused column counts the attention kernel as a Triton launch too. On the CPU, choose_tokens sorts"
        " with topk and a tie check; a GPU takes one full stable sort instead, so its count there is a little lower.)",
        "",
        "Torch ops of the fused steps, by name (all scales):",
        "",
        ", ".join(f"{n} {c}" for n, c in sorted(per_step_names.items(), key=lambda kv: -kv[1])),
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
