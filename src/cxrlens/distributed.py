"""Several processes for ``explain``, ``nap`` and ``score``: start them, share the work, combine the results.

Training runs on Lightning's DDP; the three analysis stages use this small module instead, because what
they share out is images, not gradient steps. The stages call the helpers below, which do nothing in a
single process (no process group), so one process behaves exactly as before:

* :func:`launch` runs a function on ``devices x num_nodes`` processes. Started by ``torchrun`` (or any
  launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), it joins that group; otherwise it starts
  ``devices - 1`` more processes with ``torch.multiprocessing`` (spawn) and runs rank 0 itself, like
  Lightning's launcher. The backend is gloo on CPU and NCCL on GPUs (one GPU per process); the same code
  runs on both.
* :func:`owned` deals work units (chunks, batches, blocks of images) round-robin to the processes.
  Units have a fixed composition whatever the number of processes, so every image is computed in exactly
  the batch a single process would use: per-image results are identical, and only sums taken across
  processes differ, by float rounding.
* :func:`all_reduce`, :func:`gather` and :func:`same_everywhere` combine results; :func:`is_main` says
  which process writes the outputs (rank 0, once).

A user error (:class:`CxrlensError`) raised in any process ends the whole job with that one line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np

from cxrlens.errors import CxrlensError
from cxrlens.runtime import keep_freed_memory, kept_freed_memory

ACCELERATORS = ("auto", "cpu", "gpu")
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# how long a collective waits: at the end, the first process done waits for the last one's final chunk (an
# occlusion chunk of many models at 512 px can take hours); a peer that dies is noticed at once regardless
_TIMEOUT = timedelta(hours=12)
_local_rank = 0  # GPU index of this process, set when it joins a group
_single_gpu = False  # one process launched on a GPU (no group): device() is cuda:0


@dataclass(frozen=True)
class Launch:
    """How many processes run a job, and where.

    devices: processes per machine (one GPU each on GPUs); num_nodes: machines (each runs the same
    command, with ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` set, or under ``torchrun``);
    accelerator: ``cpu`` (gloo), ``gpu`` (NCCL) or ``auto`` (GPUs when CUDA has enough of them, as
    Lightning's ``auto``; one process then runs on ``cuda:0``);
    threads: torch threads per started process (None: torch's default, e.g. ``OMP_NUM_THREADS``).
    """

    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CxrlensError(f"--{name.replace('_', '-')} must be a whole number >= 1, not {value!r}")
        if self.accelerator not in ACCELERATORS:
            raise CxrlensError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, not '{self.accelerator}'")
        if self.threads is not None and self.threads < 1:
            raise CxrlensError(f"threads must be >= 1, not {self.threads}")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


# --- where this process stands ----------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside a process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes outputs and prints (rank 0)."""
    return rank() == 0


def device(default: str = "cpu"):
    """The torch device of this process: its GPU under NCCL; ``cuda:0`` for one process launched on a
    GPU, unless ``default`` names another device; else ``default``."""
    import torch

    if active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", _local_rank)
    return torch.device("cuda", 0) if _single_gpu and default == "cpu" else torch.device(default)


def owned(units: int) -> list[int]:
    """The work units (0 .. units-1) this process computes: every ``world_size``-th, from its rank."""
    return list(range(rank(), units, world_size()))


# --- combining results ------------------------------------------------------------------------------

_OPS = ("sum", "min", "max")


def all_reduce(array: np.ndarray, op: str = "sum") -> np.ndarray:
    """``array`` combined element-wise over every process (sum, min or max), in its dtype; a copy.
    One process: the array itself."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}")
    if not active():
        return array
    import torch

    dist = _dist()
    tensor = torch.from_numpy(np.ascontiguousarray(array)).clone().to(device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor.cpu().numpy()


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process. One process: ``[obj]``."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def same_everywhere(value: Any, what: str) -> None:
    """Raise :class:`CxrlensError` unless every process holds the same ``value`` (e.g. the image list
    each node read: a node that sees other files would silently compute something else)."""
    values = gather(value)
    for r, other in enumerate(values):
        if other != values[0]:
            raise CxrlensError(
                f"process {r} sees another {what} than process 0; every machine must see the same files and options"
            )


def barrier() -> None:
    if active():
        _dist().barrier()


# --- starting processes -----------------------------------------------------------------------------


def _backend(accelerator: str, devices: int) -> str:
    import torch

    if accelerator == "cpu":
        return "gloo"
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "gpu" and available < devices:
        raise CxrlensError(
            f"--accelerator gpu with --devices {devices} needs {devices} GPUs, this machine has {available}; "
            "lower --devices or use --accelerator cpu"
        )
    return "nccl" if available >= devices and available > 0 else "gloo"


def _from_launcher() -> bool:
    return all(v in os.environ for v in _LAUNCHER_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


@contextmanager
def _process_group(backend: str, rank_: int, world: int, local_rank: int, init_method: str) -> Iterator[None]:
    global _local_rank
    import torch

    dist = _dist()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    _local_rank = local_rank
    dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world, timeout=_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _local_rank = 0


def _wait_until_started(children: list, started: Any) -> None:
    """Wait until every started process has reached ``_child``. One that dies before (an import or an
    argument that fails in the new process) would otherwise leave this one waiting in the group's
    rendezvous for the whole timeout."""
    import time

    ready: set[int] = set()
    while len(ready) < len(children):
        while not started.empty():
            ready.add(started.get())
        for local, child in enumerate(children, start=1):
            if local not in ready and child.exitcode is not None:
                raise CxrlensError(f"process {local} stopped before it started (exit status {child.exitcode}); "
                                   "see its message above")
        time.sleep(0.02)


def _child(local_rank: int, node_rank: int, launch: Launch, backend: str, init_method: str, errors: Any,
           started: Any, call: tuple[Callable, tuple, dict]) -> None:
    """Body of a started process: join the group, run ``fn(*args, **kwargs)``, report a user error to rank 0."""
    import torch

    started.put(local_rank)  # it got this far: imports and arguments are fine
    fn, args, kwargs, keep_memory = call
    if keep_memory:  # the starting process keeps freed memory (cxrlens.runtime): this one does too
        keep_freed_memory()
    if launch.threads:
        torch.set_num_threads(launch.threads)
    global_rank = node_rank * launch.devices + local_rank
    try:
        with _process_group(backend, global_rank, launch.world_size, local_rank, init_method):
            fn(*args, **kwargs)
    except CxrlensError as exc:
        errors.put((global_rank, str(exc)))
        raise SystemExit(2) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _address(launch: Launch) -> tuple[str, int, int]:
    """(master address, port, this node's rank) for processes this call starts itself."""
    if launch.num_nodes == 1:
        return "127.0.0.1", _free_port(), 0
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if v not in os.environ]
    if missing:
        raise CxrlensError(
            f"--num-nodes {launch.num_nodes} needs {', '.join(missing)} set on every machine (the address and port "
            "of node 0 and this node's number), or start the command with torchrun --nnodes ... --nproc-per-node ..."
        )
    node_rank = int(os.environ["NODE_RANK"])
    if not 0 <= node_rank < launch.num_nodes:
        raise CxrlensError(f"NODE_RANK={node_rank} is outside 0..{launch.num_nodes - 1}")
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), node_rank


def launch(fn: Callable, *args: Any, launch: Launch | None = None, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on every process of ``launch``; return its result on rank 0 (None on
    the others). ``fn`` and its arguments must be picklable (a module-level function and configs) when
    processes are started here. One process and no launcher: a plain call."""
    launch = launch or Launch()
    if active():  # already inside a group (e.g. called from a launched job)
        return fn(*args, **kwargs)
    if _from_launcher():
        backend = _backend(launch.accelerator, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        with _process_group(backend, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                            int(os.environ.get("LOCAL_RANK", "0")), "env://"):
            result = fn(*args, **kwargs)
            return result if is_main() else None
    if launch.world_size == 1:
        return _run_alone(fn, args, kwargs, _backend(launch.accelerator, 1) == "nccl")
    return _spawn(fn, args, kwargs, launch)


def _run_alone(fn: Callable, args: tuple, kwargs: dict, gpu: bool) -> Any:
    """One process, no group: on the GPU when the accelerator says so (or auto finds one)."""
    global _single_gpu
    _single_gpu = gpu
    try:
        return fn(*args, **kwargs)
    finally:
        _single_gpu = False


def _spawn(fn: Callable, args: tuple, kwargs: dict, launch: Launch) -> Any:
    """Start local ranks 1.. as new processes, run local rank 0 here, and wait for all of them."""
    import torch

    backend = _backend(launch.accelerator, launch.devices)
    threads_before = torch.get_num_threads()
    if launch.threads is None and backend == "gloo":  # N processes share the cores instead of each taking all
        launch = replace(launch, threads=max(1, threads_before // launch.devices))
    torch.set_num_threads(launch.threads or threads_before)
    try:
        return _run_spawned(fn, args, kwargs, launch, backend)
    finally:
        torch.set_num_threads(threads_before)


def _run_spawned(fn: Callable, args: tuple, kwargs: dict, launch: Launch, backend: str) -> Any:
    import torch.multiprocessing as mp

    host, port, node_rank = _address(launch)
    init_method = f"tcp://{host}:{port}"
    context = mp.get_context("spawn")
    errors, started = context.SimpleQueue(), context.SimpleQueue()
    call = (fn, args, kwargs, kept_freed_memory())
    children = [context.Process(target=_child,
                                args=(local, node_rank, launch, backend, init_method, errors, started, call))
                for local in range(1, launch.devices)]
    for child in children:
        child.start()
    result, failure, finished = None, None, False
    try:
        _wait_until_started(children, started)
        with _process_group(backend, node_rank * launch.devices, launch.world_size, 0, init_method):
            result = fn(*args, **kwargs)
        finished = True
    except (CxrlensError, RuntimeError) as exc:  # RuntimeError: a collective failed, a peer died (it says why)
        failure = exc
    finally:  # after a failure (or Ctrl-C) the others may wait in a collective: give them a moment, then stop them
        for child in children:
            child.join(timeout=None if finished else 5)
            if child.is_alive():
                child.terminate()
                child.join()
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if isinstance(failure, CxrlensError):
        raise failure
    if reported:
        r, message = min(reported)
        raise CxrlensError(f"process {r}: {message}")
    if failure is not None:
        raise failure
    crashed = [(i + 1, c.exitcode) for i, c in enumerate(children) if c.exitcode != 0]
    if crashed:
        raise CxrlensError(f"process {crashed[0][0]} stopped with exit status {crashed[0][1]}; see its message above")
    return result if node_rank == 0 else None
