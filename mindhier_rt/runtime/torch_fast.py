"""The fast PyTorch backend: static buffers, one CUDA graph per scale, Triton attention, half-precision weights.

Same contract and same decode loop as the eager ``TorchBackend``; what changes is how a scale's step runs:

- Every per-scan tensor a step reads (start token, AdaLN vectors, the context K/V of every layer, the
  block-causal self-attention cache, the scale's input tokens) lives in a buffer allocated once per row count
  (``StaticScan``). ``prepare`` and ``select`` copy into those buffers; nothing is allocated per step.
- On CUDA, scale i's step (embedding, all blocks, head) is captured as one CUDA graph the first time it runs
  for a row count, after two warm-up runs on a side stream, and replayed afterwards: one launch per scale.
  The graphs stay valid across scans because the buffers do (a second decode of the same batch size replays).
- Attention inside the graphs goes through the block-sparse Triton kernel
  (``mindhier_rt.kernels.scale_attention``) when Triton is available, else SDPA.
- Encoder and generator weights in bfloat16 (default on CUDA) or float16; RMSNorm statistics are computed in
  float32 by the model code, logits are returned in float32, and the VQ-VAE stays in float32 (its residual
  accumulation of f_hat is where precision matters, and it is a small share of the time).

On the CPU the backend falls back cleanly: float32, no CUDA graphs, SDPA, but the same static-buffer code path,
so its bookkeeping is tested here against the eager backend (identical tokens). The backend casts and moves the
given models in place: pass a copy to keep an eager float32 reference in the same process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from mindhier_rt.errors import ConfigError
from mindhier_rt.models.attention import AttentionMode, attention_mode
from mindhier_rt.models.blocks import SelfKVCache
from mindhier_rt.models.generator import ScaleGenerator, ScanState
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.runtime.torch_backend import TorchBackend, cast_condition

log = logging.getLogger(__name__)

HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _has_triton() -> bool:
    try:
        from mindhier_rt.kernels.scale_attention import HAS_TRITON
    except ImportError:
        return False
    return bool(HAS_TRITON)


class StaticScan:
    """All per-scan buffers of one row count, the per-scale step bodies and their CUDA graphs."""

    def __init__(self, gen: ScaleGenerator, rows: int, cuda_graphs: bool, attention: AttentionMode) -> None:
        p = next(gen.parameters())
        dev, dt = p.device, p.dtype
        g, sched = gen.cfg.generator, gen.schedule
        C, H, c, S = g.width, g.heads, g.head_dim, sched.context_length
        self.gen, self.rows, self.cuda_graphs, self.attention = gen, rows, cuda_graphs, attention
        self.start_B1C = torch.zeros(rows, 1, C, device=dev, dtype=dt)
        self.ada_blocks = [torch.zeros(rows, 6, C, device=dev, dtype=dt) for _ in gen.blocks]
        self.ada_head_B2C = torch.zeros(rows, 2, C, device=dev, dtype=dt)
        self.ctx_kv = None
        if gen.has_context:
            self.ctx_kv = [
                (torch.zeros(rows, H, S, c, device=dev, dtype=dt), torch.zeros(rows, H, S, c, device=dev, dtype=dt))
                for _ in gen.blocks
            ]
        self.self_kv: list[SelfKVCache] | None = None
        if g.attn_mode == "block_causal":
            self.self_kv = [SelfKVCache(rows, H, sched.total_tokens, c, dev, dt) for _ in gen.blocks]
        E = gen.cfg.latent_dim
        self.x_in = [None] + [torch.zeros(rows, n, E, device=dev, dtype=dt) for n in sched.token_counts[1:]]
        self.logits: list[Tensor | None] = [None] * sched.n_scales
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * sched.n_scales

    # ---- loading state ---------------------------------------------------------------------------
    def load(self, state: ScanState) -> None:
        """Copy an eager ``prepare`` result into the buffers (same row count)."""
        self.start_B1C.copy_(state.start_B1C)
        for dst, src in zip(self.ada_blocks, state.ada_blocks, strict=True):
            dst.copy_(src)
        self.ada_head_B2C.copy_(state.ada_head_B2C)
        for (dk, dv), (sk, sv) in zip(self.ctx_kv or (), state.ctx_kv or (), strict=True):
            dk.copy_(sk)
            dv.copy_(sv)

    def load_rows(self, other: StaticScan, rows: slice) -> None:
        """Take some rows of another scan's buffers (guidance switched off), self-attention cache included."""
        self.start_B1C.copy_(other.start_B1C[rows])
        for dst, src in zip(self.ada_blocks, other.ada_blocks, strict=True):
            dst.copy_(src[rows])
        self.ada_head_B2C.copy_(other.ada_head_B2C[rows])
        for (dk, dv), (sk, sv) in zip(self.ctx_kv or (), other.ctx_kv or (), strict=True):
            dk.copy_(sk[rows])
            dv.copy_(sv[rows])
        if self.self_kv is not None and other.self_kv is not None:
            for dst, src in zip(self.self_kv, other.self_kv, strict=True):
                dst.k_BHLc.copy_(src.k_BHLc[rows])
                dst.v_BHLc.copy_(src.v_BHLc[rows])

    # ---- one scale ---------------------------------------------------------------------------------
    def _body(self, i: int) -> Tensor:
        gen, sched = self.gen, self.gen.schedule
        ctx = sched.context_slice(i)
        cos_lc, sin_lc = gen.rope(i)
        with attention_mode(self.attention):
            return gen.blocks_step(
                gen.embed_scale(i, self.x_in[i], self.start_B1C),
                cos_lc,
                sin_lc,
                self.ada_blocks,
                self.ada_head_B2C,
                None if self.ctx_kv is None else [(k[:, :, ctx], v[:, :, ctx]) for k, v in self.ctx_kv],
                self.self_kv,
                sched.offsets[i],
            )

    def _capture(self, i: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS workspaces, Triton autotune/compile, kernel tables
                self._body(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits[i] = self._body(i)
        self.graphs[i] = graph
        log.debug("captured the CUDA graph of scale %d for %d rows", i, self.rows)

    def run(self, i: int, x_BlE: Tensor | None) -> Tensor:
        if i > 0:
            assert x_BlE is not None
            self.x_in[i].copy_(x_BlE)
        if not self.cuda_graphs:
            return self._body(i)
        if self.graphs[i] is None:
            self._capture(i)
        self.graphs[i].replay()
        return self.logits[i]


@dataclass
class FastState:
    scan: StaticScan


class FastTorchBackend(TorchBackend):
    """``TorchBackend`` with static buffers, CUDA graphs, Triton attention and half-precision weights."""

    name = "torch-fast"

    def __init__(
        self,
        models: MindHier,
        device: torch.device | str | None = None,
        dtype: str | None = None,
        cuda_graphs: bool | None = None,
        attention: AttentionMode | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        dtype = dtype or ("bfloat16" if cuda else "float32")
        if dtype not in HALF_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(HALF_DTYPES)}, got {dtype!r}")
        if not cuda and dtype != "float32":
            raise ConfigError(f"the fast backend runs {dtype} on CUDA only; on {self.device} use float32")
        if cuda_graphs and not cuda:
            raise ConfigError("CUDA graphs need a CUDA device")
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        if attention is None:
            attention = "triton" if cuda and _has_triton() else "sdpa"
        if attention == "triton" and not _has_triton():
            raise ConfigError("attention='triton' needs Triton: pip install triton (CUDA builds of torch bring it)")
        self.attention: AttentionMode = attention
        self.dtype = HALF_DTYPES[dtype]
        if not cuda:
            log.info(
                "fast backend on %s: float32, static buffers, no CUDA graphs, %s attention", self.device, attention
            )
        super().__init__(models, self.device, self.dtype)  # moves the models, casts encoder + generator
        models.vqvae.float()
        self._scans: dict[int, StaticScan] = {}

    def _scan(self, rows: int) -> StaticScan:
        if rows not in self._scans:
            self._scans[rows] = StaticScan(self.models.generator, rows, self.cuda_graphs, self.attention)
        return self._scans[rows]

    # ---- the decode contract ---------------------------------------------------------------------
    # encode, empty_fhat, update and decode_image are the eager backend's.
    @torch.inference_mode()
    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None) -> FastState:
        gen = self.models.generator
        state = gen.prepare(*cast_condition(pooled_BD, context_BSD, self.device, self.dtype), self_cache=False)
        scan = self._scan(pooled_BD.shape[0])
        scan.load(state)
        return FastState(scan)

    @torch.inference_mode()
    def select(self, state: FastState, rows: slice) -> FastState:
        n = len(range(*rows.indices(state.scan.rows)))
        scan = self._scan(n)
        scan.load_rows(state.scan, rows)
        return FastState(scan)

    @torch.inference_mode()
    def step(self, i: int, state: FastState, x_BlE: Tensor | None) -> Tensor:
        # a copy: the graph's output buffer is overwritten by the next replay
        return state.scan.run(i, x_BlE).float().clone()
