"""Tensor-parallel execution: rank 0 in the engine's process, ranks 1..N-1 in workers.

Rank 0 keeps everything but its slice of the model to itself: scheduler, KV block
manager, sampler, transfers. Each step it sends the step's sequences down a pipe to every
worker, then all ranks run the same forward — the same code path, so the same collectives
in the same order (CUDA-graph replay included) — and rank 0 samples from the all-gathered
logits. Workers never decide anything; they die with the pipe.

KV transfer sees whole heads: `ShardedKV` stands in for the cache list on rank 0. A
prefill step names the blocks its layer hooks will ship (`export_blocks`); after each
layer every rank contributes its heads of those blocks and rank 0 serves `read_blocks`
from the gathered copy. On decode, arriving blocks are staged on rank 0 and written by
every rank (its own heads) at the start of the next step, before anything reads them: a
request joins a step only after its transfer is DONE, which is after its blocks arrived.
Because the wire format is whole heads, prefill and decode may run different TP sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.layers.attention import KVCache
from engine.model_runner import ModelRunner, StepSequence
from engine.orphans import die_with_parent
from engine.parallel import TensorParallelError, TPInfo, kv_heads_of_rank

log = logging.getLogger("tandem.tp")

STARTUP_TIMEOUT_S = float(os.environ.get("TANDEM_TP_STARTUP_TIMEOUT_S", "900"))
COLLECTIVE_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0


def tp_devices(device: str, size: int) -> list[torch.device]:
    """The device of each rank: consecutive GPUs from `device`, or the CPU for all."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return [dev] * size
    first = dev.index or 0
    have = torch.cuda.device_count()
    if first + size > have:
        raise TensorParallelError(
            f"tensor parallel size {size} needs {size} GPUs from cuda:{first}; "
            f"this machine has {have}"
        )
    return [torch.device("cuda", first + r) for r in range(size)]


def make_group(rank: int, size: int, store: Any, device: torch.device) -> Any:
    """A process group over `store`: NCCL between GPUs, gloo on the CPU."""
    import torch.distributed as dist

    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=COLLECTIVE_TIMEOUT_S))


@dataclass
class StepCommand:
    """One step, as every worker runs it."""

    seqs: list[StepSequence]
    hook: bool  # rank 0 runs a layer hook: the eager path, never a graph
    export_blocks: list[int] = field(default_factory=list)
    imports: list[tuple[int, list[int], torch.Tensor, torch.Tensor]] = field(default_factory=list)


class ShardedKV(Sequence[KVCache]):
    """What transports see on rank 0 instead of the cache list: whole-head shapes (meta
    tensors), reads served from the heads gathered during the step, writes staged."""

    def __init__(self, runner: TPModelRunner, layout: list[KVCache]) -> None:
        self._runner, self._layout = runner, layout

    def __len__(self) -> int:
        return len(self._layout)

    def __getitem__(self, layer):  # type: ignore[no-untyped-def, override]
        return self._layout[layer]

    def read_blocks(self, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._runner.exported(layer, ids)

    def write_blocks(self, layer: int, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        self._runner.stage_import(layer, ids, k, v)


class KVHeads:
    """Moves KV between whole heads and each rank's slice (`kv_heads_of_rank`)."""

    def __init__(self, num_kv_heads: int, tp: TPInfo) -> None:
        self.tp = tp
        self.mine = kv_heads_of_rank(num_kv_heads, tp.size, tp.rank)
        owners: dict[int, int] = {}  # global head -> its first position in the all-gather
        for r in range(tp.size):
            for j, h in enumerate(kv_heads_of_rank(num_kv_heads, tp.size, r)):
                owners.setdefault(h, r * len(self.mine) + j)
        self.pick = [owners[h] for h in range(num_kv_heads)]

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[n, bs, local, D]` on every rank -> `[n, bs, H_kv, D]` whole heads."""
        both = self.tp.all_gather(torch.stack([k, v]), dim=3)  # [2, n, bs, size*local, D]
        both = both[:, :, :, self.pick]
        return both[0], both[1]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a whole-head `[n, bs, H_kv, D]` tensor."""
        return t[:, :, self.mine]


class TPRank:
    """One rank's model runner plus the KV export/import of a step (every rank)."""

    def __init__(self, runner: ModelRunner, tp: TPInfo, num_kv_heads: int) -> None:
        self.runner, self.tp = runner, tp
        self.heads = KVHeads(num_kv_heads, tp)
        self.gathered: dict[int, tuple[dict[int, int], torch.Tensor, torch.Tensor]] = {}

    def step(
        self, cmd: StepCommand, after_layer: Callable[[int], None] | None
    ) -> list[torch.Tensor]:
        self._apply_imports(cmd.imports)
        hook = None
        if cmd.hook:
            export = list(dict.fromkeys(cmd.export_blocks))

            def hook(i: int) -> None:
                if export:
                    self._gather(i, export)
                if after_layer is not None:
                    after_layer(i)
                self.gathered.pop(i, None)

        return self.runner.run(cmd.seqs, hook)

    def _apply_imports(self, imports: list[tuple[int, list[int], Any, Any]]) -> None:
        dev = self.runner.device
        for layer, ids, k, v in imports:
            k_cache, v_cache = self.runner.kv_caches[layer]
            idx = torch.tensor(ids, dtype=torch.long, device=dev)
            k_cache.index_copy_(0, idx, self.heads.local(k.to(dev)).to(k_cache.dtype))
            v_cache.index_copy_(0, idx, self.heads.local(v.to(dev)).to(v_cache.dtype))

    def _gather(self, layer: int, ids: list[int]) -> None:
        k_cache, v_cache = self.runner.kv_caches[layer]
        idx = torch.tensor(ids, dtype=torch.long, device=k_cache.device)
        k, v = self.heads.gather(k_cache.index_select(0, idx), v_cache.index_select(0, idx))
        self.gathered[layer] = ({b: i for i, b in enumerate(ids)}, k, v)


class TPModelRunner:
    """Rank 0's runner: the `ModelRunner` interface over all ranks."""

    def __init__(
        self,
        runner: ModelRunner,
        cfg: ModelConfig,
        tp: TPInfo,
        workers: TPWorkers,
    ) -> None:
        self.rank0 = TPRank(runner, tp, cfg.text.num_kv_heads)
        self.workers = workers
        self.tp = tp
        self.block_size, self.num_blocks = runner.block_size, runner.num_blocks
        self.dtype, self.device = runner.dtype, runner.device
        t = cfg.text
        shape = (runner.num_blocks, runner.block_size, t.num_kv_heads, t.head_dim)
        meta = [
            (
                torch.empty(shape, dtype=runner.dtype, device="meta"),
                torch.empty(shape, dtype=runner.dtype, device="meta"),
            )
            for _ in range(t.num_layers)
        ]
        self.kv_caches = ShardedKV(self, meta)
        self._lock = threading.Lock()  # receivers stage from their own threads
        self._staged: list[tuple[int, list[int], torch.Tensor, torch.Tensor]] = []

    def run(
        self,
        seqs: list[StepSequence],
        after_layer: Callable[[int], None] | None = None,
        export_blocks: list[int] | None = None,
    ) -> list[torch.Tensor]:
        with self._lock:
            imports, self._staged = self._staged, []
        cmd = StepCommand(seqs, after_layer is not None, list(export_blocks or []), imports)
        self.workers.send(cmd)
        try:
            return self.rank0.step(cmd, after_layer)
        except RuntimeError as e:  # a collective failed: name the rank that went away
            self.workers.check_alive(e)
            raise

    def exported(self, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.rank0.gathered.get(layer)
        if got is None or any(b not in got[0] for b in ids):
            raise RuntimeError(
                f"layer {layer}: blocks {ids} were not named in the step's export_blocks"
            )
        rows, k, v = got
        idx = torch.tensor([rows[b] for b in ids], dtype=torch.long, device=k.device)
        return k.index_select(0, idx), v.index_select(0, idx)

    def stage_import(self, layer: int, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        with self._lock:  # the frame's buffer may be reused: keep a copy
            self._staged.append((layer, list(ids), k.clone(), v.clone()))

    def shutdown(self) -> None:
        self.workers.stop()


# ---------------------------------------------------------------------------- workers


class TPWorkers:
    """Ranks 1..N-1: `python -m engine.tp_executor` processes, each with a command pipe
    (a socketpair, so no `__main__` guard is asked of the caller's script)."""

    def __init__(self, args: Any, num_blocks: int, devices: list[torch.device]) -> None:
        import torch.distributed as dist

        from engine import tp_wire as wire  # msgspec: only tensor-parallel engines need it

        self.size = len(devices)
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            self.size,
            is_master=True,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
            wait_for_workers=False,
        )
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pipes: list[Connection] = []
        self._stopped = False
        for rank in range(1, self.size):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.tp_executor", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
            )
            theirs.close()
            pipe = Connection(ours.detach())
            spec = wire.Spec(
                dataclasses.asdict(args),
                num_blocks,
                rank,
                self.size,
                self._store.port,
                str(devices[rank]),
            )
            pipe.send_bytes(wire.encode(spec))
            self._procs.append(proc)
            self._pipes.append(pipe)
        self.group: Any = None

    def connect(self, device: torch.device) -> TPInfo:
        """Rank 0 joins the group (waits for every worker to join)."""
        try:
            self.group = make_group(0, self.size, self._store, device)
        except Exception as e:
            self.stop()
            raise TensorParallelError(f"tensor-parallel workers did not join: {e}") from e
        return TPInfo(0, self.size, self.group)

    def wait_ready(self) -> None:
        """Block until every worker loaded its slice, or raise with the worker's error."""
        from engine import tp_wire as wire  # msgspec: only tensor-parallel engines need it

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for rank, (proc, pipe) in enumerate(zip(self._procs, self._pipes, strict=True), 1):
            while not pipe.poll(0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise TensorParallelError(f"tensor-parallel rank {rank} died while loading")
            status, _ = wire.decode(pipe.recv_bytes())
            if not isinstance(status, wire.Status) or not status.ok:
                self.stop()
                detail = status.detail if isinstance(status, wire.Status) else "bad answer"
                raise TensorParallelError(f"tensor-parallel rank {rank}: {detail}")

    def check_alive(self, cause: BaseException | None = None, wait_s: float = 5.0) -> None:
        """Raise naming the first worker that exited. After a failed collective a peer may
        still be dying (its socket closes before it is reaped): wait up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self._procs, 1):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} is gone (exit code {proc.returncode})"
                    ) from cause
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def send(self, cmd: StepCommand) -> None:
        from engine import tp_wire as wire  # msgspec: only tensor-parallel engines need it

        # msgpack header + raw tensor bytes, never pickle (ARCHITECTURE §3); tensors on the
        # host, since the workers own other devices
        data = wire.encode_step(cmd.seqs, cmd.hook, cmd.export_blocks, cmd.imports)
        for rank, pipe in enumerate(self._pipes, 1):
            try:
                pipe.send_bytes(data)
            except (BrokenPipeError, OSError) as e:
                self.check_alive(e)
                raise RuntimeError(f"tensor-parallel rank {rank} is gone") from e

    def stop(self) -> None:
        """Tell every worker to exit; kill those that do not. Idempotent."""
        from engine import tp_wire as wire  # msgspec: only tensor-parallel engines need it

        if self._stopped:
            return
        self._stopped = True
        for pipe in self._pipes:
            with contextlib.suppress(Exception):
                pipe.send_bytes(wire.encode(wire.Stop()))
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self._procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pipe in self._pipes:
            pipe.close()
        if self.group is not None:
            with contextlib.suppress(Exception):
                self.group.shutdown()
        self.group = None

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self._procs]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]


def worker_main(pipe: Connection) -> None:
    """Rank N: join the group, load this rank's slice, run steps until told or orphaned."""
    from engine import tp_wire as wire  # msgspec: only tensor-parallel engines need it

    die_with_parent()
    spec, _ = wire.decode(pipe.recv_bytes())
    assert isinstance(spec, wire.Spec), spec
    import torch.distributed as dist

    from engine.llm_engine import EngineArgs, load_for_rank
    from engine.parallel import use_tp

    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.size))
    try:
        store = dist.TCPStore(
            "127.0.0.1",
            spec.store_port,
            spec.size,
            is_master=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        group = make_group(spec.rank, spec.size, store, device)
        tp = TPInfo(spec.rank, spec.size, group)
        with use_tp(tp):
            runner, cfg = load_for_rank(EngineArgs(**spec.args), spec.num_blocks, device)
        rank = TPRank(runner, tp, cfg.text.num_kv_heads)
    except Exception as e:  # report, then exit: rank 0 raises it
        log.debug("rank %d failed to start:\n%s", spec.rank, traceback.format_exc())
        with contextlib.suppress(Exception):
            pipe.send_bytes(wire.encode(wire.Status(False, f"{type(e).__name__}: {e}")))
        return
    pipe.send_bytes(wire.encode(wire.Status(True)))
    with torch.inference_mode():
        while True:
            try:
                msg, tail = wire.decode(pipe.recv_bytes())
            except (EOFError, OSError):
                break  # rank 0 is gone
            if not isinstance(msg, wire.Step):
                break  # Stop
            seqs, imports = wire.step_parts(msg, tail)
            rank.step(StepCommand(seqs, msg.hook, msg.export_blocks, imports), None)
    with contextlib.suppress(Exception):
        group.shutdown()


if __name__ == "__main__":
    worker_main(Connection(int(sys.argv[1])))
