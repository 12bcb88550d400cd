"""Process groups for Megatron ranks: init from env, model-parallel layout, seeds, and a local spawner."""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl import platform
from megatron_rl.parallel import ParallelConfig


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> None:
    """Initialises torch.distributed from env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and Megatron's
    model-parallel groups. Safe to call again with another layout after `destroy_model_parallel()`."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    platform.apply()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not platform.use_cpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _rendezvous_store(timeout)  # None: torch's env:// rendezvous (torchrun, srun)
        if store is None and world == 1 and "MASTER_PORT" not in os.environ:
            store = dist.HashStore()  # a world of one process meets no one: no port to take
        dist.init_process_group(platform.backend(), store=store, rank=rank, world_size=world, timeout=timeout)
    parallel.check_world(dist.get_world_size())  # raises a LayoutError naming the fix
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=max(1, -(-timeout_s // 60)),  # Megatron's groups: the same timeout
    )
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def teardown() -> None:
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# Rendezvous. A port probed free and bound only when the process group starts can be taken in between
# (EADDRINUSE, seen in CI with Ray's processes opening connections all the time). So the world's store is
# opened on a port the kernel picks, before anyone is told where to meet, and stays open: in rank 0 of a Ray
# world (`host_rendezvous`), or in the parent of a spawned one. Every rank then joins it as a client
# (HOSTED_STORE_ENV), each `initialize` under a prefix of its own: spawned ranks initialise again at other
# layouts (the conversions), and a store bound again would give EADDRINUSE.
HOSTED_STORE_ENV = "MEGATRON_RL_HOSTED_STORE"
_store: dist.TCPStore | None = None  # this process's handle on its world's hosted store
_inits = 0


def host_rendezvous(host: str) -> int:
    """Rank 0 of a Ray world, before the others learn where to meet: opens the world's store and keeps it
    for `initialize`; returns its port."""
    global _store
    _store = _open_store(host)
    return _store.port


def _open_store(host: str) -> dist.TCPStore:
    return dist.TCPStore(host, 0, None, is_master=True, wait_for_workers=False)


def _rendezvous_store(timeout: datetime.timedelta) -> dist.Store | None:
    global _store, _inits
    if os.environ.get(HOSTED_STORE_ENV) != "1":
        return None
    if _store is None:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        _store = dist.TCPStore(host, port, None, is_master=False, timeout=timeout)
    _store.set_timeout(timeout)
    _inits += 1  # every rank initialises the same number of times, so the prefixes agree
    return dist.PrefixStore(f"init{_inits}", _store)


def _worker(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, results: Any, log_name: str | None
) -> None:
    from megatron_rl.process_lifetime import die_with_parent

    die_with_parent()  # a rank whose launcher is gone would train on alone, writing into its run directory
    if log_name:
        from megatron_rl import console

        console.redirect_to_log(f"{log_name}_rank{rank}")
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **{HOSTED_STORE_ENV: "1"},
    )
    import warnings

    # Megatron warns at import about missing TE/apex and deprecated args; the fallbacks are intended.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Each rank gets an equal share of the cores; oversubscription makes gloo ranks crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from megatron_rl.errors import UserError

    try:
        # Plain pickle copies tensors into the message. torch's queue would share their storage through a
        # file descriptor that this process must still serve when the parent reads it; a rank that had
        # already exited left the parent with FileNotFoundError (seen once under a loaded CI run).
        results.put((rank, "ok", pickle.dumps(fn(rank, *args))))
    except UserError as exc:  # bad input: the parent re-raises it as is, without a traceback
        results.put((rank, "user_error", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class SpawnError(RuntimeError):
    """A spawned rank failed; the message holds its traceback."""


def spawn(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 900, log_name: str | None = None
) -> list[Any]:
    """Runs fn(rank, *args) in `world_size` fresh processes (a local gloo/nccl world) and returns each rank's
    return value. A failing rank stops the others and raises SpawnError with its traceback; no hangs.
    With `log_name`, a rank's output goes to the run's `logs/<log_name>_rank<r>.log` (megatron_rl.console)."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store = _open_store("127.0.0.1")  # held here until every rank is done
    port = store.port
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, results, log_name), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = _now() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in outputs]
                if dead:
                    raise SpawnError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                        + _log_hint(log_name, dead[0])
                    ) from None
                if _now() > deadline:
                    raise SpawnError(f"spawned world did not finish within {timeout_s:.0f} s") from None
                continue
            if status == "user_error":
                from megatron_rl.errors import UserError

                raise UserError(value)
            if status == "error":
                raise SpawnError(f"rank {rank} failed: {value}")
            outputs[rank] = pickle.loads(value)  # our own child's return value, pickled just above
    finally:
        for p in procs:
            p.join(timeout=5 if len(outputs) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        del store
    return [outputs[r] for r in range(world_size)]


def _log_hint(log_name: str | None, rank: int) -> str:
    """Where a dead rank's last words are (its traceback or a C++ abort never reached the queue)."""
    from megatron_rl import console

    folder = console.log_dir()
    if not log_name or folder is None:
        return ""
    return console.log_hint(folder / f"{log_name}_rank{rank}.log", tail_lines=15)


def _now() -> float:
    import time

    return time.monotonic()
