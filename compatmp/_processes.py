"""The process transport: worker processes (fork, forkserver, spawn) over duplex pipes.

One implementation of NOTE [ Worker transports ] (:mod:`compatmp._transport`). How a process
is launched (no ``__main__`` re-run, SIGINT blocked, the forkserver preload) is
:mod:`compatmp._launch`'s job; this module owns the processes afterwards: the wait on their
pipes and sentinels together (loky's crash-detection technique, NOTE [ Why multiprocessing
contexts, not loky ] in :mod:`compatmp._core`), their stack files for stall reports, and the
stop -> SIGTERM -> SIGKILL shutdown. Batches arrive through the workers' shared-memory blocks
(NOTE [ Shared-memory ownership ] in :mod:`compatmp._batch_blocks`), named by :attr:`shm_prefix`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from multiprocessing.connection import wait as _mp_wait
from typing import Any

from . import _batch_blocks, _launch, _shm, _shm_names, _stall, _worker
from ._transport import MAIN_POLL_INTERVAL, Transport, WorkerHandle, shutdown_step

__all__ = [
    "KILL_TIMEOUT",
    "TERMINATE_TIMEOUT",
    "ProcessHandle",
    "ProcessTransport",
]

# After SIGTERM, how long to wait before SIGKILL (seconds). SIGTERM's default action ends a
# Python process at once unless it installed a handler, so this is rarely used in full.
TERMINATE_TIMEOUT = 1.0

# After SIGKILL, the bound on waiting for the kernel to reap the process (seconds).
KILL_TIMEOUT = 5.0


def _fds_of(h: Any) -> tuple[int, int]:
    """A process handle's pipe descriptor and sentinel, in that order."""
    return h.channel.conn.fileno(), h.proc.sentinel


class ProcessHandle(WorkerHandle):
    """The main side's view of one worker process.

    Args:
        worker_id (int): the worker's index.
        channel (compatmp._worker.ConnectionChannel): the main end of its pipe.
        proc (multiprocessing.process.BaseProcess): the worker process (not yet started).
        stack_file (compatmp._stall.StackFile | None): where it dumps its stacks on SIGUSR1.
    """

    def __init__(
        self, worker_id: int, channel: Any, proc: Any, stack_file: _stall.StackFile | None
    ) -> None:
        super().__init__(worker_id, channel)
        self.proc = proc
        self.stack_file = stack_file

    @property
    def started(self) -> bool:
        """The process was started (a failed start-up leaves some registered, not started).

        Read from :attr:`pid`, which the transport sets once start-up ended, so it stays
        valid after ``Process.close()``."""
        return self.pid is not None

    def is_alive(self) -> bool:
        return self.started and self.proc.is_alive()

    def wait_for_exit(self, timeout: float) -> None:
        if self.started:
            self.proc.join(timeout)

    def exitcode(self, wait: float) -> int | None:
        if not self.started:
            return None
        self.proc.join(timeout=wait)  # a zombie is reaped at once
        return self.proc.exitcode

    def on_ready(self) -> None:
        if self.stack_file is not None:  # the worker has it open: drop the name
            self.stack_file.unlink()

    def stack(self) -> str:
        if not self.ready:
            return "(no stack: the worker is still starting or loading the dataset)"
        if self.stack_file is None or self.pid is None:
            return "(no stack: worker stacks are not available on this platform)"
        return _stall.process_stack(self.pid, self.stack_file)


class ProcessTransport(Transport):
    """Worker processes started with ``multiprocessing.get_context(method)``.

    Creating it prepares the pool's shared memory: the resource tracker is started (POSIX),
    the block prefix chosen, and blocks of dead owners swept (NOTE [ Shared-memory
    ownership ], rule 5).

    Args:
        method (str): ``"fork"``, ``"forkserver"`` or ``"spawn"``.
        stall_timeout (float | None): seconds; when set (and POSIX), each worker gets a
            :class:`compatmp._stall.StackFile` for stall reports.
    """

    skips_orphans = True  # ConnectionChannel.read_ahead (NOTE [ Worker protocol ])

    def __init__(self, method: str, stall_timeout: float | None) -> None:
        super().__init__(method, stall_timeout)
        if os.name != "nt":  # Windows has no resource tracker
            _shm.ensure_tracker()
        self.shm_prefix = _shm_names.block_prefix(os.getpid(), _shm_names.pool_token())
        _shm_names.sweep_dead_owners()
        # wait(): the poll object of the last set of handles (issue 18 item 4)
        self._poll_key: tuple | None = None
        self._poll_fds: dict[int, tuple[WorkerHandle, bool]] = {}
        self._poller: _worker.FdPoll | None = None

    def start(self, configs: list[_worker.WorkerConfig]) -> None:
        # Stack files are made first: the config a process starts with names its file.
        stack_files = {c.worker_id: self._new_stack_file() for c in configs}
        configs = [
            replace(
                c,
                in_process=True,
                shm_prefix=self.shm_prefix,
                stack_file=None
                if stack_files[c.worker_id] is None
                else stack_files[c.worker_id].path,
            )
            for c in configs
        ]

        def register(config: _worker.WorkerConfig, conn: Any, proc: Any) -> None:
            channel = _worker.ConnectionChannel(conn)
            stack_file = stack_files.pop(config.worker_id)
            self.handles.append(ProcessHandle(config.worker_id, channel, proc, stack_file))

        try:
            _launch.start_processes(self.method, configs, register)
        finally:
            for h in self.handles:
                h.pid = h.proc.pid  # type: ignore[attr-defined]
            for leftover in stack_files.values():  # start-up failed before these workers
                if leftover is not None:
                    leftover.close()

    def _new_stack_file(self) -> _stall.StackFile | None:
        if not self.stall_timeout or not _stall.supported():
            return None
        return _stall.StackFile()

    def wait(
        self, handles: list[WorkerHandle], timeout: float
    ) -> tuple[list[WorkerHandle], list[WorkerHandle]]:
        if _worker.FdPoll.supported():  # one poll object while the handles stay the same
            key = tuple((id(h), h.channel.conn.fileno(), h.proc.sentinel) for h in handles)
            if key != self._poll_key:
                fds = {fd: (h, i == 1) for h in handles for i, fd in enumerate(_fds_of(h))}
                self._poll_key, self._poll_fds = key, fds
                self._poller = _worker.FdPoll(list(fds))
            fds = self._poll_fds
            ready_fds = self._poller.ready(timeout)
            readable = [fds[fd][0] for fd in ready_fds if not fds[fd][1]]
            dead = [fds[fd][0] for fd in ready_fds if fds[fd][1]]
            return readable, dead
        waitables: dict[Any, tuple[WorkerHandle, bool]] = {}
        for h in handles:
            assert isinstance(h, ProcessHandle)
            waitables[h.channel.conn] = (h, False)
            waitables[h.proc.sentinel] = (h, True)
        ready = _mp_wait(list(waitables), timeout)
        readable = [waitables[r][0] for r in ready if not waitables[r][1]]
        dead = [waitables[r][0] for r in ready if waitables[r][1]]
        return readable, dead

    def blocks_of(self, batch: Any) -> list[str]:
        return _batch_blocks.names(batch)

    def shutdown(self, deadline: float, drain: Any) -> None:
        procs: list[ProcessHandle] = list(self.handles)  # type: ignore[arg-type]
        started = [h for h in procs if h.started]  # a failed start-up leaves some unstarted
        # Drain while they finish their current batch, so none blocks sending it.
        shutdown_step("draining the workers", lambda: self._drain_until(started, deadline, drain))
        for h in started:
            shutdown_step(f"terminating {h.label()}", lambda h=h: _terminate(h))
        term_deadline = time.monotonic() + TERMINATE_TIMEOUT
        for h in started:
            shutdown_step(
                f"joining {h.label()}",
                lambda h=h: h.proc.join(max(0.0, term_deadline - time.monotonic())),
            )
        for h in started:
            shutdown_step(f"killing {h.label()}", lambda h=h: _kill(h))
        for h in procs:
            shutdown_step(f"closing {h.label()}'s process object", lambda h=h: _close(h))
        for h in procs:
            shutdown_step(f"draining {h.label()}'s pipe", lambda h=h: drain(h))
            shutdown_step(f"closing {h.label()}'s pipe", h.channel.close)
            if h.stack_file is not None:
                shutdown_step(f"removing {h.label()}'s stack file", h.stack_file.close)

    @staticmethod
    def _drain_until(procs: list[ProcessHandle], deadline: float, drain: Any) -> None:
        while time.monotonic() < deadline and any(h.proc.is_alive() for h in procs):
            conns = [h.channel.conn for h in procs if not h.channel.conn.closed]
            sentinels = [h.proc.sentinel for h in procs if h.proc.is_alive()]
            ready = _mp_wait(
                conns + sentinels, min(MAIN_POLL_INTERVAL, deadline - time.monotonic())
            )
            for h in procs:
                if h.channel.conn in ready:
                    drain(h)

    def sweep(self) -> None:
        if self.shm_prefix is not None:
            _shm_names.sweep(self.shm_prefix)  # blocks of SIGKILLed workers

    def forget_in_child(self) -> None:
        for h in self.handles:
            try:
                h.channel.close()
            except OSError:
                pass


def _terminate(h: ProcessHandle) -> None:
    if h.proc.is_alive():
        h.proc.terminate()


def _kill(h: ProcessHandle) -> None:
    if h.proc.is_alive():
        h.proc.kill()
        h.proc.join(KILL_TIMEOUT)


def _close(h: ProcessHandle) -> None:
    # Process.close() raises ValueError while the process runs (a worker SIGKILL could not
    # end within KILL_TIMEOUT); it keeps its resources then, and the next steps still run.
    if not h.proc.is_alive():
        h.proc.close()
