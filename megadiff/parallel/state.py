"""Process group and megatron-core model-parallel state set-up / tear-down."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megadiff.config import Config, ConfigError
from megadiff.parallel import cpu_compat
from megadiff.parallel.env import LaunchEnv, read_launch_env


@dataclass(frozen=True)
class Ranks:
    """This process's coordinates in the TP x PP x DP grid."""

    rank: int
    world: int
    tp_rank: int
    tp: int
    pp_rank: int
    pp: int
    dp_rank: int
    dp: int

    @property
    def is_logger(self) -> bool:
        """The rank that prints and writes metrics: TP rank 0, DP rank 0, last pipeline stage."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.pp - 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


TIMEOUT = datetime.timedelta(minutes=30)
PORT_TAKEN = "EADDRINUSE"  # in the error of a rank that cannot listen on the rendezvous port
_STORE: dist.Store | None = None


class RendezvousError(ConfigError):
    """The launch's rendezvous address cannot be used (the commands exit 2)."""


def launch_store(launch: LaunchEnv) -> dist.Store:
    """The launch's rendezvous store (``tcp://MASTER_ADDR:MASTER_PORT``, hosted by rank 0 or by
    torchrun's agent), opened once per process: start-up checks use it before the process
    group exists, and :func:`init_distributed` then builds the process group on it."""
    global _STORE
    if _STORE is None:
        address = f"{launch.master_addr}:{launch.master_port}"
        try:
            rendezvous = dist.rendezvous(
                f"tcp://{address}", launch.rank, launch.world_size, timeout=TIMEOUT
            )
            store, _, _ = next(rendezvous)
        except dist.DistNetworkError as e:
            if PORT_TAKEN not in str(e):
                raise
            raise RendezvousError(
                f"rank {launch.rank} cannot host the rendezvous at MASTER_ADDR:MASTER_PORT "
                f"{address}: the port is in use by another process ({PORT_TAKEN}; another run "
                "on this node?); give a free port: MASTER_PORT=P (torchrun: --master_port P; the "
                "slurm/ scripts derive it from the job id unless MASTER_PORT is set)"
            ) from None
        store.set_timeout(TIMEOUT)
        _STORE = store
    return _STORE


def _take_launch_store(launch: LaunchEnv) -> dist.Store:
    """The launch store for a new process group (the next group opens a fresh one)."""
    global _STORE
    store = launch_store(launch)
    _STORE = None
    return store


def init_distributed(cfg: Config, launch: LaunchEnv | None = None) -> Ranks:
    """Create the global process group and megatron-core's TP/PP/DP groups; seed RNGs."""
    from megatron.core import parallel_state, tensor_parallel

    launch = launch or read_launch_env()
    cpu_compat.enable()
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        if launch.world_size == 1:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT
            )
        else:
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            dist.init_process_group(
                backend,
                store=dist.PrefixStore("default_pg", _take_launch_store(launch)),
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=TIMEOUT,
            )
    p = cfg.parallel
    vpp = p.virtual_pipeline if (p.virtual_pipeline or 1) > 1 else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return current_ranks()


def current_ranks() -> Ranks:
    from megatron.core import parallel_state as ps

    return Ranks(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp=ps.get_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_single_process_layout(cfg: Config) -> None:
    """TP = PP = 1, no virtual pipeline, no sequence parallelism (in place)."""
    p = cfg.parallel
    p.tensor_parallel = p.pipeline_parallel = 1
    p.virtual_pipeline, p.sequence_parallel = None, False


@contextlib.contextmanager
def single_process_group(cfg: Config) -> Iterator[None]:
    """megatron-core's parallel state for ``cfg`` (a single-process layout: see
    :func:`set_single_process_layout`) in this process: the existing process group if there is
    one, else a one-process group created here and destroyed on exit."""
    own_group = not dist.is_initialized()
    init_distributed(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single") if own_group else None)
    try:
        yield
    finally:
        if own_group:
            destroy_distributed()
