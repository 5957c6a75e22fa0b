"""Module-level objects and child-process probes for test_serialize.py.

They live at module level so that spawn/forkserver children can import them by reference.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

from compatmp import loads

# Seconds a child may take to start (spawn imports numpy and compatmp) and answer.
CHILD_TIMEOUT = 120


class Holder:
    """A dataset-like object holding every kind of primitive compatmp rebuilds."""

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        self.rlock = threading.RLock()
        self.cond = threading.Condition()
        self.cond_on_lock = threading.Condition(self.lock)
        self.sem = threading.Semaphore(2)
        self.bsem = threading.BoundedSemaphore(3)
        self.event_set = threading.Event()
        self.event_set.set()
        self.event_clear = threading.Event()
        self.barrier = threading.Barrier(3)
        self.q = queue.Queue(maxsize=10)
        for i in range(3):
            self.q.put(i)
        self.lifo = queue.LifoQueue()
        self.lifo.put("x")
        self.lifo.put("y")
        self.prio = queue.PriorityQueue()
        for i in (5, 1, 3):
            self.prio.put(i)
        self.sq = queue.SimpleQueue()
        self.sq.put("a")
        self.sq.put("b")
        self.text = open(path, encoding="utf-8")
        self.text.readline()
        self.binary = open(path, "rb")
        self.binary.read(7)
        self.nested = {"deep": [{"lock": threading.Lock()}]}
        self.transform = lambda x: x * 2

    def hold_everything(self) -> None:
        """Put every primitive in its 'busy' state, as a running program would."""
        self.lock.acquire()  # also cond_on_lock's lock
        self.rlock.acquire()
        self.rlock.acquire()
        self.cond.acquire()
        self.sem.acquire()
        self.bsem.acquire()
        self.bsem.acquire()
        self.nested["deep"][0]["lock"].acquire()

    def close(self) -> None:
        self.text.close()
        self.binary.close()


def _usable_and_unlocked(lock) -> bool:
    # acquire(timeout) instead of blocking: a rebuilt-as-held lock must fail, not hang.
    if not lock.acquire(timeout=1):
        return False
    lock.release()
    return True


def describe(obj: Holder) -> dict:
    """What a test wants to know about a rebuilt Holder, as plain data."""
    out = {
        "lock": _usable_and_unlocked(obj.lock),
        "rlock": _usable_and_unlocked(obj.rlock),
        "cond": _usable_and_unlocked(obj.cond),
        "cond_shares_lock": obj.cond_on_lock._lock is obj.lock,
        "sem_value": obj.sem._value,
        "bsem_value": obj.bsem._value,
        "bsem_bounded": isinstance(obj.bsem, threading.BoundedSemaphore),
        "event_set": obj.event_set.is_set(),
        "event_clear": obj.event_clear.is_set(),
        "barrier_parties": obj.barrier.parties,
        "barrier_waiting": obj.barrier.n_waiting,
        "q_items": [obj.q.get_nowait() for _ in range(obj.q.qsize())],
        "q_maxsize": obj.q.maxsize,
        "lifo_order": [obj.lifo.get_nowait(), obj.lifo.get_nowait()],
        "prio_order": [obj.prio.get_nowait() for _ in range(3)],
        "sq_items": [obj.sq.get_nowait(), obj.sq.get_nowait()],
        "text_next_line": obj.text.readline(),
        "binary_next": obj.binary.read(5),
        "nested_lock": _usable_and_unlocked(obj.nested["deep"][0]["lock"]),
        "transform": obj.transform(21),
    }
    with obj.cond:  # the condition must be usable: wait with a timeout returns False
        out["cond_wait"] = obj.cond.wait(timeout=0.01)
    obj.close()
    return out


def describe_bytes(blob: bytes) -> dict:
    """Child-process entry point: unpickle with compatmp and describe."""
    return describe(loads(blob))


def describe_plain_pickle(blob: bytes) -> dict:
    """Child-process entry point: unpickle with plain pickle and describe."""
    return describe(pickle.loads(blob))


def call_in_child(method: str, func, *args):
    """Run ``func(*args)`` in one fresh worker process started with ``method``.

    ``func`` and ``args`` must pickle by plain pickle (module-level functions); the result, or
    the exception ``func`` raised, comes back. Under ``fork`` the worker is forked from a fresh
    single-threaded interpreter (:data:`_FORK_PARENT`), not from pytest's own process: by the
    time the whole suite reaches these tests, pytest's process has run TensorFlow, JAX, torch
    and Ray (33 native threads measured) and is gigabytes large, and a fork of it is what these
    tests would then measure (POSIX fork(2): after fork in a multithreaded process the child
    may only rely on async-signal-safe calls; JAX warns "os.fork() is incompatible with
    multithreaded code"; the child also inherits pytest's whole RSS, which makes it the
    OOM killer's first choice on a loaded machine). The ``BrokenProcessPool`` once seen beside
    another test run (issue 17.6: the child died before answering) was most likely one of
    those: the serializer runs only after the child has started, and raises, not dies. It did
    not recur here in 400 forks of a process with TensorFlow, JAX, torch and Ray loaded, nor
    in two concurrent runs of test_pool, test_ray and test_serialize.
    """
    if method != "fork":
        return _call_here(method, func, *args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_PARENT],
        input=pickle.dumps((func, args)),
        capture_output=True,
        timeout=CHILD_TIMEOUT + 30,
        env=env,
    )
    _, marker, result = proc.stdout.partition(_RESULT_MARKER)
    if proc.returncode != 0 or not marker:
        raise RuntimeError(
            f"the fork parent failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}"
        )
    ok, value = pickle.loads(result)
    if ok:
        return value
    raise value


def _call_here(method: str, func, *args):
    """Run ``func(*args)`` in one worker process this process starts with ``method``."""
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        return ex.submit(func, *args).result(timeout=CHILD_TIMEOUT)


_RESULT_MARKER = b"\0serialize_helpers result\0"

# The fresh interpreter that forks the worker for call_in_child("fork", ...): it imports only
# this module (and what unpickling ``func`` imports), so it has one thread when it forks.
_FORK_PARENT = f"""
import pickle, sys
import serialize_helpers as h
func, args = pickle.load(sys.stdin.buffer)
try:
    out = (True, h._call_here("fork", func, *args))
except BaseException as exc:
    out = (False, exc)
sys.stdout.flush()
sys.stdout.buffer.write({_RESULT_MARKER!r} + pickle.dumps(out))
"""


def roundtrip_value(blob: bytes):
    """Child-process entry point: unpickle and pickle back with plain pickle (for values)."""
    return loads(blob)


def send_item(blob: bytes, index: int, conn) -> None:
    """Process target: unpickle a dataset and send ``dataset[index]`` back over ``conn``."""
    conn.send(loads(blob)[index])


def parent_pid() -> int:
    """Child-process probe: the pid of the process that started this one."""
    return os.getppid()


def fail_with(message: str) -> None:
    """Child-process probe: raise ``ValueError(message)``."""
    raise ValueError(message)
