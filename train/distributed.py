"""Training in several processes under ``torchrun``: the process group, the data split, DDP / FSDP wrapping and
the gathering of sharded state for checkpoints.

Launch (one process per GPU; with no GPU, one per CPU worker on the gloo backend)::

    torchrun --standalone --nproc_per_node 8 -m mindhier_rt.cli train stage2 --data D --init CKPT --out RUN

torchrun gives every worker RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_distributed``
reads them (without them: one plain process, no process group). Backend: nccl with CUDA (device
``cuda:LOCAL_RANK``), gloo on CPU.

What makes N processes train exactly like one process on the same global batch:

- Data order: every rank draws the *global* batch from ``batch_rng(seed, step)`` as a single process would and
  keeps its contiguous slice (``DistContext.shard``: rank r takes rows [r n/N, (r + 1) n/N)). Concatenating the
  slices in rank order gives back the single-process batch, row for row. The global batch must divide by N.
- Gradients: each rank's loss is the mean over its slice; DDP and FSDP average gradients over ranks, so the
  update is the gradient of the mean over the global batch. A loss that couples the rows of a batch (SoftCLIP:
  a softmax over the whole batch) first gathers every rank's rows with ``gather_rows``, whose backward sums the
  gradients of all ranks, so that term too ends up with the single-process gradient after averaging.
- Logging, progress bars and files: rank 0 only; logged losses are averaged over ranks (the global batch's).
- Checkpoints: the same safetensors layout as single-process runs. Sharded (FSDP) tensors are gathered whole
  (``full_tensor``: a collective, every rank takes part) and rank 0 writes; on resume every rank reads the file
  and keeps its own shard (``shard_like``), one tensor at a time. The run folder must be visible to every rank
  (one node, or a shared filesystem).

FSDP flavour: ``torch.distributed.fsdp.fully_shard`` (FSDP2: per-parameter sharding, parameters become DTensors
that keep their names and shapes). Of the two APIs torch 2.14 ships it is the one that is developed, it composes
with activation checkpointing and per-module mixed precision, and because a sharded parameter is still one
tensor per name, our checkpoint format needs nothing but ``DTensor.full_tensor``; FSDP1
(``FullyShardedDataParallel``) flattens parameters into FlatParameters and needs its own state-dict modes.
It also runs on CPU with gloo, which is how the tests exercise it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mindhier_rt.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Collectives wait this long for a late rank: rank 0 may fill a teacher-feature cache while the others wait
# (``main_first``), which takes longer than the backends' default (10 min for nccl).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, device. The default is one plain process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False  # a process group exists (launched by torchrun, even with one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes files."""
        return self.rank == 0

    # ---- data -----------------------------------------------------------------------------------
    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (rows, indices or per-row flags)."""
        if self.world_size == 1:
            return rows
        n = len(rows)
        if n % self.world_size:
            raise ConfigError(
                f"a global batch of {n} rows does not split evenly over {self.world_size} processes; "
                f"use a batch size (and a data set of at least that many trials) divisible by {self.world_size}"
            )
        per = n // self.world_size
        return rows[self.rank * per : (self.rank + 1) * per]

    def gather_rows(self, x_B: Tensor) -> Tensor:
        """Every rank's rows concatenated in rank order (= the global batch's order), differentiably.

        The backward pass sums the gradients that all ranks' losses send to this rank's rows; with the gradient
        averaging of DDP/FSDP on top, a loss over the gathered batch gets the single-process gradient.
        """
        if not self.initialized or self.world_size == 1:
            return x_B
        return _GatherRows.apply(x_B, self.world_size, self.rank)

    def mean(self, values: Tensor) -> Tensor:
        """The average of ``values`` over ranks (a detached copy; the input when there is one process)."""
        if not self.initialized or self.world_size == 1:
            return values.detach()
        total = values.detach().to(self.device, copy=True)
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world_size

    def agree(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (e.g. whether a state file exists)."""
        if not self.initialized:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    # ---- wrapping -------------------------------------------------------------------------------
    def data_parallel(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` on this rank's device, wrapped in DDP when a process group exists.

        Call the returned module in the loss (its forward synchronises gradients); save and load the unwrapped
        one. ``find_unused_parameters``: some parameters may get no gradient in a step (the encoder's input
        layers of the subjects not in the batch).
        """
        module.to(self.device)
        if not self.initialized:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True
        )

    def fully_shard(
        self,
        module: nn.Module,
        units: Iterable[nn.Module],
        unit_methods: Sequence[str] = (),
        param_dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Shard ``module`` with FSDP2: each of ``units`` is one all-gather / reduce-scatter group, the rest of
        ``module`` (embeddings, head) is the root group. Returns ``module`` itself, sharded in place.

        ``unit_methods``: methods of the units that run outside ``forward`` and use their weights (FSDP gathers a
        unit's weights around them as around ``forward``). ``param_dtype`` (bf16/fp16): the gathered weights'
        dtype (the sharded fp32 weights stay the optimizer's master copy; gradients are reduced in fp32). Inputs
        are not cast: with low-precision weights the caller runs under autocast (the training loop does), which
        then decides each op's precision exactly as without FSDP (fp32 residual stream, norms and RoPE tables).
        Casting inputs would also make checkpointed blocks recompute with other dtypes than their forward saw
        on torch versions whose recompute skips the cast (seen with 2.11 on CUDA).
        Without a process group this only moves ``module`` to the device.
        """
        module.to(self.device)
        if not self.initialized:
            return module
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        _broadcast_from_rank0(module)  # every rank shards the same weights
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None, cast_forward_inputs=False
        )
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
            for name in unit_methods:
                register_fsdp_forward_method(unit, name)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the others (e.g. fill a disk cache once, then read it)."""
        if self.initialized and not self.is_main:
            dist.barrier()
        yield
        if self.initialized and self.is_main:
            dist.barrier()

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistContext:
    """The context of this process from torchrun's variables; a plain single process without them.

    ``device``: "cuda" or "cpu" (default: CUDA when available). Under torchrun each rank takes
    ``cuda:LOCAL_RANK`` with the nccl backend, or the CPU with gloo.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ConfigError(f"distributed launch: expected torchrun's variables {TORCHRUN_VARIABLES}, missing {missing}")
    rank, world, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank}, found {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized=True)


@contextlib.contextmanager
def distributed_session(device: str | None = None) -> Iterator[DistContext]:
    """``init_distributed`` for the length of a block; the process group is destroyed at its end."""
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        ctx.close()


# ---- sharded tensors ----------------------------------------------------------------------------
def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, gradient or optimizer state)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, detached, on the CPU. A DTensor is gathered first: every rank must call this for it."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` laid out as ``like``: this rank's shard as a DTensor when ``like`` is one, else ``full`` itself.

    Every rank passes the same full tensor (read from the same file); no communication happens.
    """
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def gathered_copy(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain module on the CPU holding ``module``'s full weights, on every rank (collective when sharded).

    ``build`` makes an empty module of the same structure (it runs on the meta device, so it costs nothing);
    buffers that are not in the state dict (derived tables) are copied as well.
    """
    state = {key: full_tensor(value) for key, value in module.state_dict().items()}
    with torch.device("meta"):
        plain = build()
    plain.to_empty(device="cpu")
    plain.load_state_dict(state)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            plain.get_buffer(name).copy_(buffer)
    return plain


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward: this rank's rows of the gradients summed over all ranks."""

    @staticmethod
    def forward(ctx, x_B: Tensor, world_size: int, rank: int) -> Tensor:
        parts = [torch.empty_like(x_B) for _ in range(world_size)]
        dist.all_gather(parts, x_B.contiguous())
        ctx.rows, ctx.rank = x_B.shape[0], rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_B: Tensor) -> tuple[Tensor, None, None]:
        total = grad_B.contiguous().clone()
        dist.all_reduce(total)  # every rank's loss reads every rank's rows
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def _broadcast_from_rank0(module: nn.Module) -> None:
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
