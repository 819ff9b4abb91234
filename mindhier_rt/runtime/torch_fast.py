"""The fast PyTorch backend: static buffers, one CUDA graph per scale, Triton attention, half-precision weights.

Same contract and same decode loop as the eager ``TorchBackend``; what changes is how a scale's step runs:

- Every per-scan tensor a step reads (start token, AdaLN vectors, the context K/V of every layer, the
  block-causal self-attention cache, the scale's embedded input tokens) lives in a buffer allocated once per row count
  (``StaticScan``). ``prepare`` and ``select`` copy into those buffers; nothing is allocated per step.
- On CUDA, scale i's step (all blocks and the head) is captured as one CUDA graph the first time it runs
  for a row count, after two warm-up runs on a side stream, and replayed afterwards: one launch per scale.
  The graphs stay valid across scans because the buffers do (a second decode of the same batch size replays).
- Attention inside the graphs goes through the block-sparse Triton kernel
  (``mindhier_rt.kernels.scale_attention``) in half precision when Triton is available, else SDPA. In float32
  the default is SDPA, as in the eager backend: the kernel's float32 dots are exact (no TF32, so that the tokens
  equal eager's), so they run without tensor cores. The H200 run of issue 14 measured the fast path with the
  kernel at 1,920 ms against eager's 1,079 ms in float32 (mindhier-512); that the kernel is the cause is not
  measured yet: ``benchmarks/gpu_bench.py`` times float32 fast (SDPA) against eager.
- The elementwise chains between a block's matmuls (sandwich RMSNorms, AdaLN modulation, residual adds,
  SwiGLU's gate, q/k LayerNorm + rotation + cache write) run as six fused Triton kernels per block
  (``mindhier_rt.kernels.fused_norm``, ``ExecutionOptions.fused_norms``) instead of about 75 small PyTorch
  kernels; SwiGLU's gate and up projections are packed into one GEMM; the context step's RMSNorms are fused
  too; each scale's token draw after the sort is one Triton kernel instead of about 110
  (``mindhier_rt.kernels.token_draw``). All of it is ``fused=True``, the default on CUDA with Triton.
- The other phases are CUDA graphs too (``GraphedCall``, one per call signature): the encoder, the context
  step (writing straight into the scan's buffers), each scale's guidance combine + token draw
  (``choose_tokens``), each scale's f_hat update with the next scale's input embedding (the contract's
  ``update``, as in the eager backend) and the VQ-VAE decoder. A phase whose capture fails runs eagerly (logged once).
- Encoder and generator weights in bfloat16 (default on CUDA) or float16; RMSNorm statistics are computed in
  float32 by the model code and logits are returned in float32. The VQ-VAE's weights stay float32: f_hat
  accumulates in float32 (its residual sum is where precision matters), and the image decoder runs under
  autocast in ``decoder_dtype``: float16 by default on CUDA (float32 on the CPU). On the tiny and small presets
  (random weights, CPU autocast) float16 decoding stays within 0.0085 (about 2/255) of float32 in every pixel,
  bfloat16 within 0.068 (``benchmarks/decoder_precision.py``, ``benchmarks/results/decoder_precision_cpu.md``).
  ``decoder_layout="channels_last"`` lays the decoder out NHWC (unmeasured on a GPU so far, so not the default).

On the CPU the backend falls back cleanly: float32, no CUDA graphs, SDPA, but the same static-buffer code path,
so its bookkeeping is tested here against the eager backend (identical tokens). The backend casts and moves the
given models in place: pass a copy to keep an eager float32 reference in the same process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mindhier_rt.errors import ConfigError, InputError
from mindhier_rt.execution import AttentionImpl, ExecutionOptions, execution
from mindhier_rt.models.blocks import SelfKVCache, SwiGLU
from mindhier_rt.models.generator import ScaleGenerator, ScanState
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.runtime.base import ScaleUpdate
from mindhier_rt.runtime.torch_backend import TorchBackend, cast_condition, update_and_embed
from mindhier_rt.sampling import SamplingConfig, choose_tokens

log = logging.getLogger(__name__)

HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DECODER_LAYOUTS = ("nchw", "channels_last")


def _has_triton() -> bool:
    try:
        from mindhier_rt.kernels.fused_norm import HAS_TRITON as fused_ok
        from mindhier_rt.kernels.scale_attention import HAS_TRITON
        from mindhier_rt.kernels.token_draw import HAS_TRITON as draw_ok
    except ImportError:
        return False
    return bool(HAS_TRITON and fused_ok and draw_ok)


class StaticScan:
    """All per-scan buffers of one row count, the per-scale step bodies and their CUDA graphs."""

    def __init__(self, gen: ScaleGenerator, rows: int, cuda_graphs: bool, options: ExecutionOptions) -> None:
        p = next(gen.parameters())
        dev, dt = p.device, p.dtype
        g, sched = gen.cfg.generator, gen.schedule
        C, H, c, S = g.width, g.heads, g.head_dim, sched.context_length
        self.gen, self.rows, self.cuda_graphs, self.options = gen, rows, cuda_graphs, options
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
        # each scale's embedded input tokens (update's output; scale 0's comes from the start token)
        self.h_in = [None] + [torch.zeros(rows, n, C, device=dev, dtype=dt) for n in sched.token_counts[1:]]
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
        cross_kv, cross_mask = gen.cross_inputs(i, self.ctx_kv)
        cos_lc, sin_lc = gen.rope(i)
        with execution(self.options):
            return gen.blocks_step(
                gen.embed_scale(0, None, self.start_B1C) if i == 0 else self.h_in[i],
                cos_lc,
                sin_lc,
                self.ada_blocks,
                self.ada_head_B2C,
                cross_kv,
                self.self_kv,
                sched.offsets[i],
                cross_mask,
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

    def run(self, i: int, h_BlC: Tensor | None) -> Tensor:
        if i > 0:
            assert h_BlC is not None
            self.h_in[i].copy_(h_BlC)
        if not self.cuda_graphs:
            return self._body(i)
        if self.graphs[i] is None:
            self._capture(i)
        self.graphs[i].replay()
        return self.logits[i]


class GraphedCall:
    """``fn`` replayed as one CUDA graph per call signature: the tensor arguments' shapes and dtypes and the
    other arguments' values. The first call of a signature runs ``fn`` twice on a side stream (warm-up: errors
    such as bad shapes surface here, eagerly), then captures it on static copies of the tensor arguments.
    Later calls copy the tensor arguments into those and replay; the outputs (a tensor, or tuples of tensors
    and None) are returned as copies, so what a caller holds survives the next replay.

    ``fn`` must be capturable: no host synchronisation, no host-to-device copies, shapes fixed by the
    signature. If a capture fails anyway, that signature runs eagerly from then on (logged once). With
    ``enabled=False`` (the CPU) every call runs ``fn`` directly.
    """

    def __init__(self, fn: Callable[..., Any], name: str, enabled: bool) -> None:
        self.fn, self.name, self.enabled = fn, name, enabled
        self._graphs: dict[tuple, tuple | None] = {}  # None: capture failed, run eagerly

    def __call__(self, *args: Any) -> Any:
        if not self.enabled:
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else a for a in args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        entry = self._graphs[key]
        if entry is None:
            return self.fn(*args)
        static_args, graph, outputs = entry
        for dst, src in zip(static_args, args, strict=True):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        graph.replay()
        return _copied(outputs)

    def _capture(self, args: tuple) -> tuple | None:
        static_args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static_args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.fn(*static_args)
        except Exception as e:
            torch.cuda.synchronize()
            log.warning("%s: CUDA graph capture failed (%s: %s); running it eagerly", self.name, type(e).__name__, e)
            return None
        log.debug("captured the CUDA graph of %s for %s", self.name, [getattr(a, "shape", a) for a in args])
        return static_args, graph, outputs


def _copied(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copied(x) for x in out)
    return out


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
        attention: AttentionImpl | None = None,
        fused: bool | None = None,
        decoder_dtype: str | None = None,
        decoder_layout: str = "nchw",
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
            # The kernel's worth is tensor cores in half precision; in float32 it computes exact float32 dots
            # (ieee, no TF32) to keep the eager tokens, without tensor cores (see the module docstring).
            attention = "triton" if cuda and dtype != "float32" and _has_triton() else "sdpa"
        if attention == "triton" and not _has_triton():
            raise ConfigError("attention='triton' needs Triton: pip install triton (CUDA builds of torch bring it)")
        if fused is None:
            fused = cuda and _has_triton()
        if fused and not _has_triton():
            raise ConfigError("fused=True needs Triton: pip install triton (CUDA builds of torch bring it)")
        self.options = ExecutionOptions(attention=attention, fused_norms=fused)  # the step's and context's paths
        self.dtype = HALF_DTYPES[dtype]
        if not cuda:
            log.info(
                "fast backend on %s: float32, static buffers, no CUDA graphs, %s attention, fused kernels %s",
                self.device,
                attention,
                "on" if fused else "off",
            )
        decoder_dtype = decoder_dtype or ("float16" if cuda else "float32")
        if decoder_dtype not in HALF_DTYPES:
            raise ConfigError(f"decoder_dtype must be one of {sorted(HALF_DTYPES)}, got {decoder_dtype!r}")
        self.decoder_dtype = HALF_DTYPES[decoder_dtype]
        if decoder_layout not in DECODER_LAYOUTS:
            raise ConfigError(f"decoder_layout must be one of {DECODER_LAYOUTS}, got {decoder_layout!r}")
        super().__init__(models, self.device, self.dtype)  # moves the models, casts encoder + generator
        models.vqvae.float()
        self.set_decoder_layout(decoder_layout)
        for block in models.generator.blocks:  # SwiGLU's gate and up projections as one GEMM (fused path)
            if isinstance(getattr(block, "ffn", None), SwiGLU):
                block.ffn.pack_gate_up()
        self._scans: dict[int, StaticScan] = {}
        graphs = self.cuda_graphs
        self._encode = GraphedCall(self._encode_eager, "encode", graphs)
        self._prepare = GraphedCall(self._prepare_eager, "context step", graphs)
        self._choose = GraphedCall(functools.partial(choose_tokens, fused=self.fused), "token choice", graphs)
        self._update = GraphedCall(
            functools.partial(update_and_embed, self.models, dtype=self.dtype), "f_hat update", graphs
        )
        self._decode = GraphedCall(self._decode_eager, "VQ decoder", graphs)

    @property
    def attention(self) -> AttentionImpl:
        return self.options.attention

    @property
    def fused(self) -> bool:
        """Fused Triton kernels: the block's norm chains (``options.fused_norms``) and the token draw."""
        return self.options.fused_norms

    def _scan(self, rows: int) -> StaticScan:
        if rows not in self._scans:
            self._scans[rows] = StaticScan(self.models.generator, rows, self.cuda_graphs, self.options)
        return self._scans[rows]

    def set_decoder_layout(self, layout: str) -> None:
        """Lay the image decoder's convolution weights (and its input) out as ``"nchw"`` or ``"channels_last"``
        (NHWC, what cuDNN's half-precision kernels read without a transpose). Not yet measured on a GPU, so off by
        default; ``benchmarks/gpu_bench.py`` times both. Changing it drops the decoder's captured graphs."""
        if layout not in DECODER_LAYOUTS:
            raise ConfigError(f"decoder_layout must be one of {DECODER_LAYOUTS}, got {layout!r}")
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        vq = self.models.vqvae
        for module in (vq.post_quant_conv, vq.decoder):
            module.to(memory_format=fmt)
        self.decoder_layout = layout
        if hasattr(self, "_decode"):
            self._decode = GraphedCall(self._decode_eager, "VQ decoder", self.cuda_graphs)

    # ---- eager bodies of the graphed phases -----------------------------------------------------------
    def _encode_eager(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        out = self.models.encoder(voxels_BV, subject)
        return out.pooled_BD, out.context_BSD()

    def _prepare_eager(self, cond: Tensor, context_BSD: Tensor | None, rows: int) -> None:
        with execution(self.options):  # the context's RMSNorm of every block
            self._scan(rows).load(self.models.generator.prepare(cond, context_BSD, self_cache=False))

    def _decode_eager(self, f_hat_BEhw: Tensor) -> Tensor:
        if self.decoder_layout == "channels_last":
            f_hat_BEhw = f_hat_BEhw.contiguous(memory_format=torch.channels_last)
        if self.decoder_dtype == torch.float32:
            img_B3HW = self.models.vqvae.fhat_to_img(f_hat_BEhw)
        else:
            # autocast's weight cache off: required under CUDA graph capture
            with torch.autocast(self.device.type, dtype=self.decoder_dtype, cache_enabled=False):
                img_B3HW = self.models.vqvae.fhat_to_img(f_hat_BEhw).float()
        return img_B3HW.contiguous()

    # ---- the decode contract ---------------------------------------------------------------------
    # empty_fhat is the eager backend's.
    @torch.inference_mode()
    def encode(self, voxels_BV: Tensor, subject: str) -> tuple[Tensor, Tensor]:
        if self.models.encoder is None:
            raise InputError(f"model {self.cfg.name} has no fMRI encoder: it cannot decode voxels")
        # the loop has checked the voxels (a replayed graph checks nothing)
        return self._encode(voxels_BV.to(self.device, self.dtype), subject)

    @torch.inference_mode()
    def prepare(self, pooled_BD: Tensor, context_BSD: Tensor | None) -> FastState:
        cond, context_BSD = cast_condition(pooled_BD, context_BSD, self.device, self.dtype)
        scan = self._scan(cond.shape[0])  # allocated before any capture
        self._prepare(cond, context_BSD, scan.rows)
        return FastState(scan)

    @torch.inference_mode()
    def select(self, state: FastState, rows: slice) -> FastState:
        n = len(range(*rows.indices(state.scan.rows)))
        scan = self._scan(n)
        scan.load_rows(state.scan, rows)
        return FastState(scan)

    @torch.inference_mode()
    def step(self, i: int, state: FastState, h_BlC: Tensor | None) -> Tensor:
        # one float32 copy: the graph's output buffer is overwritten by the next replay
        return state.scan.run(i, h_BlC).to(torch.float32, copy=True)

    @torch.inference_mode()
    def choose_tokens(
        self,
        logits_BlV: Tensor,
        scfg: SamplingConfig,
        scale: int,
        guidance: float | None,
        scan_ids: Tensor,
        sample_ids: Tensor,
    ) -> Tensor:
        """``sampling.choose_tokens`` (guidance combine + draw), replayed as a CUDA graph per scale."""
        return self._choose(logits_BlV, scfg, scale, guidance, scan_ids, sample_ids)

    @torch.inference_mode()
    def update(self, i: int, f_hat_BEhw: Tensor, idx_Bl: Tensor) -> ScaleUpdate:
        return ScaleUpdate(*self._update(i, f_hat_BEhw, idx_Bl))

    @torch.inference_mode()
    def decode_image(self, f_hat_BEhw: Tensor) -> Tensor:
        return self._decode(f_hat_BEhw)
