"""The launcher's world: ranks from the environment, the command line Hydra parses, the process group, and one
run directory shared by every rank. Nothing here knows about DeepSpeed or the model."""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Dict, List, Tuple

import torch

from infllm.config import Config
from infllm.errors import ConfigError


def launch_env() -> Tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's (or the deepspeed launcher's) environment; (0, 0, 1)
    for a plain `python train.py`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local_rank, world_size


def launcher_argv(argv: List[str]) -> List[str]:
    """The command line Hydra should parse, given the one a launcher started us with.

    - The deepspeed launcher appends `--local_rank=N` (or `--local_rank N`): Hydra would reject it. It is dropped
      and kept in LOCAL_RANK, where torchrun puts it anyway.
    - Ranks > 0 neither write Hydra's `.hydra/` config copy nor its log file: rank 0 writes them into the run
      directory all ranks share; the other ranks log warnings and errors to their stdout.
    - A Hydra multirun (`-m`) inside one torchrun would re-initialise the process group for its second job and
      hang there; sweeps run each point as its own torchrun (launch/sweep.py).
    """
    out = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(args, "0"))
        else:
            out.append(arg)
    rank, _, world_size = launch_env()
    if world_size > 1 and any(a in ("-m", "--multirun") for a in out[1:]):
        raise SystemExit("a Hydra multirun (-m) cannot run inside one torchrun (the second job would hang "
                         "re-initialising the process group); sweep with `python launch/sweep.py` instead, which "
                         "starts one torchrun per point")
    if rank > 0:
        out += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return out


def check_world_size(cfg: Config, world_size: int) -> None:
    expected = cfg.parallel.world_size
    if expected and expected != world_size:
        raise ConfigError(f"parallel.world_size: the config expects {expected} processes but this run has "
                          f"{world_size} (WORLD_SIZE from the launcher); launch with NGPU={expected} "
                          "(launch/run.sh) or set parallel.world_size=0 to accept any number")
    if cfg.parallel.engine == "single" and world_size > 1:
        raise ConfigError(f"parallel.engine: single runs one process, but the launcher started {world_size}; "
                          "choose a distributed preset, e.g. parallel=zero2 or parallel=zero3")


def init_process_group(device: torch.device, timeout_minutes: int) -> None:
    """Open the default process group from the launcher's environment: NCCL on GPU, gloo on CPU.
    A plain `python train.py parallel=zero2` becomes a world of one on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    kwargs: Dict[str, Any] = dict(timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs.update(backend="nccl", device_id=device)
    else:
        kwargs.update(backend="gloo")
    dist.init_process_group(**kwargs)
    import atexit

    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            # Leave together: a gloo rank whose peer has already torn its connections down can abort at exit
            # ("terminate called without an active exception"). Bounded, so a crashed peer cannot hang us.
            with contextlib.suppress(Exception):
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_run_dir(cfg: Config) -> None:
    """Make every rank use rank 0's run directory. The launch scripts pass one explicit `run_name`; without it
    each process resolved its own `${now:}` timestamp, which can differ by a second between ranks."""
    import torch.distributed as dist

    chosen = [cfg.output_dir, cfg.run_name]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != cfg.output_dir:
        # Hydra created this rank's own (empty: ranks > 0 write no Hydra files) directory; remove it.
        with contextlib.suppress(OSError):
            os.rmdir(cfg.output_dir)
        cfg.output_dir, cfg.run_name = chosen
