"""How much GPU memory stage 2 (generator training) takes per GPU, before anything is allocated.

``estimate_stage2_memory`` counts, in bytes per GPU:

- ``parameters``: the fp32 weights the optimizer updates (1/N of them each under FSDP with N GPUs).
- ``gradients``: their fp32 gradients (1/N each under FSDP; DDP's buckets alias them: ``gradient_as_bucket_view``).
- ``adamw_states``: AdamW's two fp32 moments per weight (1/N each under FSDP).
- ``working_copies``: weights and gradients that exist only during the forward and backward passes: under FSDP
  the gathered weights of the root group and of two blocks (the one computing and the one being prefetched) in the
  compute dtype, and one block's gathered gradients before their reduce-scatter; without FSDP and with AMP,
  autocast's cache of every Linear weight cast to bf16/fp16 (kept for the whole forward pass).
- ``activations``: the tensors the teacher-forced pass saves for backward, counted per block from its code
  (``block_activation_bytes``) and checked against what autograd actually saves (tests/test_distributed.py).
  With gradient checkpointing only each block's input is kept, plus one block recomputed at a time.
- ``optimizer_step``: the temporary of the (foreach) AdamW step, one fp32 tensor per weight (sqrt of the second
  moments; 1/N each under FSDP). It exists after the backward pass, when activations and working copies are gone.
- ``total``: the peak, parameters + gradients + adamw_states + max(working_copies + activations, optimizer_step).

Not counted: the CUDA context and kernels' workspaces (~0.5-1 GiB), allocator fragmentation, transient
gradients of activations during backward (about one block's worth), the frozen encoder and VQ-VAE (stage 2 runs
them once, up front, then moves them off the GPU), and the data batch itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mindhier_rt.config import ModelConfig
from mindhier_rt.errors import ConfigError

AMP_BYTES = {"off": 4, "bf16": 2, "fp16": 2}
FP32 = 4


def _counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the generator, built on the meta device (instant at any size)."""
    from mindhier_rt.models.generator import ScaleGenerator

    with torch.device("meta"):
        gen = ScaleGenerator(cfg)
    linear = sum(p.numel() for m in gen.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return {
        "total": sum(p.numel() for p in gen.parameters()),
        "trainable": sum(p.numel() for p in gen.parameters() if p.requires_grad),
        "block": max(sum(p.numel() for p in b.parameters()) for b in gen.blocks),
        "blocks": sum(p.numel() for b in gen.blocks for p in b.parameters()),
        "linear": linear,
    }


def block_activation_bytes(cfg: ModelConfig, amp: str) -> tuple[int, int]:
    """Bytes one Switti block saves for backward in the teacher-forced pass: (per sample, per batch).

    Per token, with c = bytes of the compute dtype (autocast's bf16/fp16, or fp32), C width, F SwiGLU width:

    - 14 tensors of width C kept in fp32 whatever the AMP setting: each RMSNorm computes in fp32 and keeps its
      input and its normalised value (2 x 6 norms), and the AdaLN-modulated norm outputs before self-attention
      and the FFN follow the fp32 residual stream (2);
    - 14 of width C in the compute dtype: the Linear inputs of to_qkv, to_q and the FFN (3), the fused qkv (3),
      rotated q and k (2), the normalised cross-attention query before and after its LayerNorm (2), both attention
      outputs (2), the two gated branch outputs (2);
    - 4 of width F: gate, SiLU(gate), up and their product;
    - per sample, the context (S tokens, width D): the RMSNorm's fp32 value, the to_kv input, the K/V projection
      (2C) and the normalised keys (C) in the compute dtype;
    - per batch: SDPA turns the boolean masks into additive biases, [L, L] and [L, S], in the compute dtype.
    """
    c = AMP_BYTES[amp]
    g = cfg.generator
    L, C, F = cfg.schedule.total_tokens, g.width, g.ffn_dim
    S, D = cfg.n_levels * cfg.context_tokens, cfg.context_dim
    per_token = 14 * C * FP32 + 14 * C * c + 4 * F * c
    per_sample = L * per_token + S * D * FP32 + S * D * c + 3 * S * C * c
    per_batch = (L * L + L * S) * c
    return per_sample, per_batch


def _outside_blocks_bytes(cfg: ModelConfig, amp: str) -> int:
    """Per sample: the head (LayerNorm input and modulated output in fp32, the head's input, the fp32
    log-softmax over the vocabulary that cross-entropy keeps) and the token embedding's input."""
    c = AMP_BYTES[amp]
    L, C, V, E = cfg.schedule.total_tokens, cfg.generator.width, cfg.vocab_size, cfg.latent_dim
    return L * (2 * C * FP32 + C * c + V * FP32) + (L - 1) * E * c


def estimate_stage2_memory(
    cfg: ModelConfig,
    batch_per_gpu: int,
    world_size: int = 1,
    amp: str = "bf16",
    grad_checkpoint: bool = False,
    fsdp: bool = True,
) -> dict[str, int]:
    """Bytes per GPU for training ``cfg``'s generator: parameters, gradients, adamw_states, working_copies,
    activations, optimizer_step and their peak, total.

    ``fsdp``: weights, gradients and AdamW states sharded over ``world_size`` GPUs (else replicated: DDP or a
    single GPU). ``amp``: "off", "bf16" or "fp16". See the module docstring for what each entry holds.
    """
    if amp not in AMP_BYTES:
        raise ConfigError(f"amp must be one of {tuple(AMP_BYTES)}, got {amp!r}")
    if batch_per_gpu < 1 or world_size < 1:
        raise ConfigError(f"expected batch_per_gpu >= 1 and world_size >= 1, got {batch_per_gpu} and {world_size}")
    if cfg.generator.block != "switti":
        raise ConfigError(f"the estimate counts Switti blocks; {cfg.name} has {cfg.generator.block!r} blocks")
    n = _counts(cfg)
    c = AMP_BYTES[amp]
    shards = world_size if fsdp else 1
    root = n["total"] - n["blocks"]
    working = 0
    if fsdp and world_size > 1:
        working += (root + 2 * n["block"]) * c  # gathered root group + the computing and the prefetched block
        working += n["block"] * (c + FP32)  # one block's gathered gradients and their fp32 copy for the reduction
    elif amp != "off":
        working += n["linear"] * c  # autocast's low-precision copies of the Linear weights
    per_sample, per_batch = block_activation_bytes(cfg, amp)
    depth = cfg.generator.depth
    L, C = cfg.schedule.total_tokens, cfg.generator.width
    if grad_checkpoint:  # every block's fp32 input, plus one block's activations while it is recomputed
        blocks = batch_per_gpu * (depth * L * C * FP32 + per_sample) + per_batch
    else:
        blocks = depth * (batch_per_gpu * per_sample + per_batch)
    activations = blocks + batch_per_gpu * _outside_blocks_bytes(cfg, amp)
    out = {
        "parameters": math.ceil(n["total"] * FP32 / shards),
        "gradients": math.ceil(n["trainable"] * FP32 / shards),
        "adamw_states": math.ceil(2 * n["trainable"] * FP32 / shards),
        "working_copies": working,
        "activations": activations,
        "optimizer_step": math.ceil(n["trainable"] * FP32 / shards),
    }
    persistent = out["parameters"] + out["gradients"] + out["adamw_states"]
    out["total"] = persistent + max(working + activations, out["optimizer_step"])
    return out


def memory_table(
    cfg: ModelConfig,
    estimate: dict[str, int],
    batch_per_gpu: int,
    world_size: int,
    amp: str,
    grad_checkpoint: bool,
    fsdp: bool,
) -> str:
    """The estimate as a small text table with the settings it was made for."""
    n = _counts(cfg)
    mode = "1 GPU" if world_size == 1 else f"{'FSDP' if fsdp else 'DDP'} over {world_size} GPUs"
    checkpointing = "on" if grad_checkpoint else "off"
    lines = [
        f"stage 2 memory per GPU, {cfg.name} generator ({n['trainable'] / 1e9:.2f} B trainable parameters)",
        f"  {mode}, batch {batch_per_gpu} per GPU, amp {amp}, gradient checkpointing {checkpointing}",
    ]
    notes = {"optimizer_step": "  (after backward: not at the same time as the two above)", "total": "  (peak)"}
    for key in ("parameters", "gradients", "adamw_states", "working_copies", "activations", "optimizer_step", "total"):
        label = key.replace("_", " ")
        lines.append(f"  {label:<15} {estimate[key] / 2**30:8.2f} GiB{notes.get(key, '')}")
    return "\n".join(lines)
