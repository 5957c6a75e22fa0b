"""The thread transport: worker threads of the main process over in-memory mailboxes.

One implementation of NOTE [ Worker transports ] (:mod:`compatmp._transport`). The dataset,
batches and exceptions pass by reference (nothing is pickled, nothing is in shared memory);
every worker's main-side mailbox shares one condition, so :meth:`ThreadTransport.wait` wakes
for a message from any worker. A thread cannot be killed: :meth:`ThreadTransport.shutdown`
closes the channels (a worker busy in ``dataset[i]`` ends after that batch) and joins each
thread until the deadline; the threads are daemons, so one stuck in ``dataset[i]`` does not
keep the interpreter alive.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import replace
from typing import Any

from . import _stall, _worker
from ._transport import Transport, WorkerHandle, take_back_tasks

__all__ = ["ThreadHandle", "ThreadTransport"]


class ThreadHandle(WorkerHandle):
    """The main side's view of one worker thread.

    Args:
        worker_id (int): the worker's index.
        channel (compatmp._worker.QueueChannel): the main end of its mailboxes.
        thread (threading.Thread): the worker thread (started).
    """

    def __init__(self, worker_id: int, channel: Any, thread: threading.Thread) -> None:
        super().__init__(worker_id, channel)
        self.thread = thread
        self.error: BaseException | None = None  # what ended the thread, if anything did

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def describe_death(self, code: int | None) -> tuple[str, str]:
        if self.error is not None:
            how = (
                f"ended with {type(self.error).__name__}: {self.error} (its traceback is on "
                "stderr above)"
            )
        else:
            how = "ended unexpectedly"
        return f"worker thread {self.id}", how

    def stall_label(self) -> str:
        return f"worker thread {self.id} (in the main process, pid {os.getpid()})"

    def stack(self) -> str:
        return _stall.thread_stack(self.thread.ident)


def _thread_main(handle: ThreadHandle, channel: Any, config: _worker.WorkerConfig) -> None:
    """A worker thread's body: :func:`compatmp._worker.worker_main`, keeping what ended it.

    An exception escaping the worker loop (a protocol error, a bug) ends the thread; it is
    kept for :meth:`ThreadHandle.describe_death` and re-raised, so ``threading.excepthook``
    prints its traceback as for any thread.
    """
    try:
        _worker.worker_main(channel, config)
    except BaseException as exc:
        handle.error = exc
        raise


class ThreadTransport(Transport):
    """Worker threads in this process (``start_method="thread"``).

    Args:
        method (str): ``"thread"``.
        stall_timeout (float | None): unused (a thread's stack is read from its frame).
    """

    def __init__(self, method: str, stall_timeout: float | None) -> None:
        super().__init__(method, stall_timeout)
        self.cond = threading.Condition(threading.Lock())  # "a message arrived"

    def start(self, configs: list[_worker.WorkerConfig]) -> None:
        for config in configs:
            config = replace(config, in_process=False, shm_prefix=None, stack_file=None)
            main_end, worker_end = _worker.thread_channel_pair(self.cond)
            thread = threading.Thread(name=f"compatmp-worker-{config.worker_id}", daemon=True)
            handle = ThreadHandle(config.worker_id, main_end, thread)
            thread.run = functools.partial(_thread_main, handle, worker_end, config)
            self.handles.append(handle)
            thread.start()

    def wait(
        self, handles: list[WorkerHandle], timeout: float
    ) -> tuple[list[WorkerHandle], list[WorkerHandle]]:
        with self.cond:
            self.cond.wait_for(lambda: any(h.channel.ready() for h in handles), timeout)
            readable = [h for h in handles if h.channel.ready()]
        # A thread that ended closed its channel, which stays "ready" (recv raises EOFError):
        # report it dead even so, or the core would drain nothing and wait again at once,
        # forever (issue 17). The core drains a dead worker's messages before reporting it.
        dead = [h for h in handles if not h.is_alive()]
        return readable, dead

    def withdraw(self, handle: WorkerHandle, send_idxs: set[int]) -> list[int]:
        inbox = handle.channel.outbox  # the worker's inbox: messages it has not read yet
        with inbox.cond:
            return take_back_tasks(inbox.items, send_idxs)

    def rebuild_exception(self, msg: tuple) -> BaseException:
        return _worker.rebuild_exception(msg, by_reference=True)

    def shutdown(self, deadline: float, drain: Any) -> None:
        for h in self.handles:
            h.channel.close()  # a worker busy in dataset[i] ends after its batch
        me = threading.current_thread()
        for h in self.handles:
            assert isinstance(h, ThreadHandle)
            if h.thread is not me:  # GC may run the pool's finalizer in a worker thread
                h.thread.join(max(0.0, deadline - time.monotonic()))
