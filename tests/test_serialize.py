"""compatmp's serializer: locks and friends rebuilt unlocked, in real child processes."""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import serialize_helpers as h

from compatmp import (
    PickleSafeMixin,
    SerializationError,
    Unpicklable,
    available_methods,
    dumps,
    find_unpicklable,
    loads,
)

METHODS = available_methods()

EXPECTED = {
    "lock": True,
    "rlock": True,
    "cond": True,
    "cond_shares_lock": True,
    "sem_value": 1,  # Semaphore(2) acquired once keeps its current value
    "bsem_value": 3,  # BoundedSemaphore comes back fully released
    "bsem_bounded": True,
    "event_set": True,
    "event_clear": False,
    "barrier_parties": 3,
    "barrier_waiting": 0,
    "q_items": [0, 1, 2],
    "q_maxsize": 10,
    "lifo_order": ["y", "x"],
    "prio_order": [1, 3, 5],
    "sq_items": ["a", "b"],
    "binary_next": None,  # filled in per test from the file itself
    "text_next_line": None,
    "nested_lock": True,
    "transform": 42,
    "cond_wait": False,
}


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("first line\nsecond line\nthird line\n", encoding="utf-8")
    return str(path)


def expected_for(path: str) -> dict:
    exp = dict(EXPECTED)
    exp["text_next_line"] = "second line\n"
    with open(path, "rb") as f:
        exp["binary_next"] = f.read()[7:12]
    return exp


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", METHODS)
def test_roundtrip_in_child_rebuilds_everything_unlocked(method, data_file):
    holder = h.Holder(data_file)
    holder.hold_everything()
    try:
        blob = dumps(holder)
    finally:
        holder.close()
    assert h.call_in_child(method, h.describe_bytes, blob) == expected_for(data_file)


@pytest.mark.timeout(120)
@pytest.mark.skipif("fork" not in METHODS, reason="needs the fork start method")
def test_fork_children_come_from_a_fresh_single_threaded_parent():
    # call_in_child("fork") must not fork pytest's own, many-threaded process (see its
    # docstring: BrokenProcessPool beside another test run); errors still come back typed.
    assert h.call_in_child("fork", h.parent_pid) != os.getpid()
    assert h.call_in_child("spawn", h.parent_pid) == os.getpid()  # the others: from here
    with pytest.raises(ValueError, match="from the child"):
        h.call_in_child("fork", h.fail_with, "from the child")


def test_roundtrip_in_process_matches_child(data_file):
    holder = h.Holder(data_file)
    holder.hold_everything()
    blob = dumps(holder)
    holder.close()
    assert h.describe(loads(blob)) == expected_for(data_file)


def test_original_stays_held_and_untouched(data_file):
    holder = h.Holder(data_file)
    holder.hold_everything()
    dumps(holder)
    assert holder.lock.locked()
    assert holder.sq.get_nowait() == "a"  # SimpleQueue items were put back in order
    assert holder.sq.get_nowait() == "b"
    assert holder.q.qsize() == 3
    assert holder.text.readline() == "second line\n"  # offset not moved
    holder.close()


def test_shared_lock_keeps_identity_within_one_dump():
    lock = threading.Lock()
    obj = {"a": lock, "b": [lock], "cond": threading.Condition(lock)}
    out = loads(dumps(obj))
    assert out["a"] is out["b"][0] is out["cond"]._lock
    assert out["a"] is not lock


def test_rlock_type_and_reentrancy():
    rlock = threading.RLock()
    rlock.acquire()
    out = loads(dumps(rlock))
    assert out.acquire(timeout=1) and out.acquire(timeout=1)  # re-entrant
    out.release()
    out.release()


def test_barrier_keeps_action_and_timeout():
    calls = []
    barrier = threading.Barrier(1, action=lambda: calls.append(1), timeout=7.5)
    out = loads(dumps(barrier))
    assert out._timeout == 7.5
    out.wait()  # parties=1: returns at once and runs the action
    assert out.parties == 1


def test_queue_subclass_and_unfinished_tasks():
    import queue

    class MyQueue(queue.Queue):
        pass

    q = MyQueue()
    q.put("a")
    q.put("b")
    q.get()
    out = loads(dumps(q))
    assert type(out).__name__ == "MyQueue"
    assert list(out.queue) == ["b"]
    assert out.unfinished_tasks == 2


def test_lambda_closure_and_main_class_travel_by_value():
    # A class and lambda defined in the __main__ of `python -c`: a spawned child cannot import
    # them by reference (there is no file to re-run), so they must travel by value.
    script = textwrap.dedent(
        """
        import multiprocessing, multiprocessing.connection, threading, sys
        import serialize_helpers
        from compatmp import dumps

        class Dataset:
            def __init__(self):
                self.lock = threading.Lock()
                factor = 3
                self.fn = lambda x: x * factor
            def __getitem__(self, i):
                with self.lock:
                    return self.fn(i)

        ctx = multiprocessing.get_context("spawn")
        r, w = ctx.Pipe(duplex=False)
        ds = Dataset()
        ds.lock.acquire()
        p = ctx.Process(target=serialize_helpers.send_item, args=(dumps(ds), 5, w))
        p.start()
        multiprocessing.connection.wait([r, p.sentinel], timeout=120)
        if not r.poll():
            p.kill()
            sys.exit(f"child exited with {p.exitcode} without answering")
        print(r.recv())
        p.join(30)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(h.__file__)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "15"


# --- unpicklable things are named by path ---------------------------------------------------


class _Cache:
    def __init__(self):
        self._conn = sqlite3.connect(":memory:")
        self.lock = threading.Lock()  # fine: rebuilt


class _Dataset:
    def __init__(self, tmp_path):
        self.cache = _Cache()
        self.items = [1, 2, (i for i in range(3))]
        self.log = open(tmp_path / "log.txt", "w")
        self.sock = socket.socket()
        self.ok = {"lock": threading.Lock(), "n": 1}

    def close(self):
        self.log.close()
        self.sock.close()
        self.cache._conn.close()


@pytest.fixture
def bad_dataset(tmp_path):
    ds = _Dataset(tmp_path)
    yield ds
    ds.close()


def test_find_unpicklable_names_every_path(bad_dataset):
    found = find_unpicklable(bad_dataset)
    assert [u.path for u in found] == [
        "dataset.cache._conn",
        "dataset.items[2]",
        "dataset.log",
        "dataset.sock",
    ]
    by_path = {u.path: u for u in found}
    assert by_path["dataset.cache._conn"].type_name == "sqlite3.Connection"
    assert "cannot pickle" in by_path["dataset.cache._conn"].error
    assert by_path["dataset.items[2]"].type_name == "builtins.generator"
    assert "opened for writing" in by_path["dataset.log"].error
    assert by_path["dataset.sock"].type_name == "socket.socket"
    assert all(isinstance(u, Unpicklable) for u in found)


def test_find_unpicklable_is_empty_for_picklable_objects(data_file):
    holder = h.Holder(data_file)
    try:
        assert find_unpicklable(holder) == []
    finally:
        holder.close()


def test_find_unpicklable_in_closure_and_custom_root():
    gen = (i for i in range(2))
    fn = lambda: next(gen)  # noqa: E731
    found = find_unpicklable({"transform": fn}, root="ds")
    assert [u.path for u in found] == ["ds['transform'].<closure gen>"]


def test_dumps_error_names_paths_and_fix(bad_dataset):
    with pytest.raises(SerializationError) as info:
        dumps(bad_dataset)
    err = info.value
    assert isinstance(err, pickle.PicklingError)
    msg = str(err)
    assert "dataset.cache._conn: sqlite3.Connection" in msg
    assert "dataset.items[2]: builtins.generator" in msg
    assert "How to fix" in msg
    assert err.__cause__ is not None
    assert [u.path for u in err.unpicklable][:1] == ["dataset.cache._conn"]


def test_write_mode_and_closed_files_are_refused(tmp_path):
    closed = open(tmp_path / "c.txt", "w")
    closed.close()
    with pytest.raises(SerializationError, match="closed file"):
        dumps(closed)
    with open(tmp_path / "w.bin", "wb") as f, pytest.raises(SerializationError, match="writing"):
        dumps(f)
    (tmp_path / "rw.txt").write_text("x")
    with open(tmp_path / "rw.txt", "r+") as f, pytest.raises(SerializationError, match="writing"):
        dumps(f)


def test_in_memory_file_objects_still_use_their_own_pickling():
    buf = io.BytesIO(b"abc")
    buf.read(1)
    out = loads(dumps(buf))
    assert out.read() == b"bc"


def test_multiprocessing_lock_needs_opt_in():
    ctx = multiprocessing.get_context("spawn")
    obj = {"mp_lock": ctx.Lock(), "mp_event": ctx.Event()}
    with pytest.raises(SerializationError, match=r"dataset\['mp_lock'\]"):
        dumps(obj)
    out = loads(dumps(obj, local_mp_locks=True))
    assert isinstance(out["mp_lock"], type(threading.Lock()))
    assert out["mp_event"].is_set() is False


# --- PickleSafeMixin ----------------------------------------------------------------------


class SafeHelper:
    def __init__(self):
        self.registry = {"locks": [threading.Lock(), threading.RLock()], "ev": threading.Event()}


class SafeDataset(PickleSafeMixin):
    def __init__(self, path):
        self.helper = SafeHelper()
        self.helper.registry["locks"][0].acquire()
        self.helper.registry["ev"].set()
        self.file = open(path, encoding="utf-8")
        self.file.readline()
        self.itself = self
        self.values = list(range(5))


class CustomStateDataset(PickleSafeMixin):
    def __init__(self):
        self.lock = threading.Lock()
        self.lock.acquire()
        self.scratch = "not sent"
        self.n = 3

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["scratch"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.scratch = "rebuilt"


class SlottedSafe(PickleSafeMixin):
    __slots__ = ("lock", "x")

    def __init__(self):
        self.lock = threading.Lock()
        self.x = 9


class UnsafeMixin(PickleSafeMixin):
    def __init__(self):
        self.gen = (i for i in range(3))


def check_safe_dataset(blob: bytes) -> tuple:
    ds = pickle.loads(blob)
    lock = ds.helper.registry["locks"][0]
    ok = lock.acquire(timeout=1)
    return (ok, ds.helper.registry["ev"].is_set(), ds.itself is ds, ds.file.readline(), ds.values)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", METHODS)
def test_mixin_plain_pickle_in_child(method, data_file):
    ds = SafeDataset(data_file)
    blob = pickle.dumps(ds)
    ds.file.close()
    got = h.call_in_child(method, check_safe_dataset, blob)
    assert got == (True, True, True, "second line\n", [0, 1, 2, 3, 4])


def test_mixin_composes_with_own_getstate():
    out = pickle.loads(pickle.dumps(CustomStateDataset()))
    assert out.lock.acquire(timeout=1)
    assert out.scratch == "rebuilt"
    assert out.n == 3


def test_mixin_with_slots():
    out = pickle.loads(pickle.dumps(SlottedSafe()))
    assert out.x == 9 and out.lock.acquire(timeout=1)


def test_mixin_error_names_attribute():
    with pytest.raises(SerializationError, match=r"UnsafeMixin\.gen: builtins\.generator"):
        pickle.dumps(UnsafeMixin())


def test_mixin_copy_is_shallow_and_deepcopy_rebuilds():
    ds = CustomStateDataset()
    shallow = copy.copy(ds)
    assert shallow.lock is ds.lock and shallow.scratch == "not sent"
    deep = copy.deepcopy(ds)
    assert deep.lock is not ds.lock and deep.lock.acquire(timeout=1)


def test_mixin_inside_compatmp_dumps_keeps_shared_identity():
    ds = CustomStateDataset()
    outer = {"ds": ds, "same_lock": ds.lock}
    out = loads(dumps(outer))
    assert out["ds"].lock is out["same_lock"]
    assert out["ds"].scratch == "rebuilt"


def test_out_of_band_buffers_stay_out_of_the_pickle_and_are_shared_on_load():
    np = pytest.importorskip("numpy")
    data = {"x": np.arange(1_000_000, dtype=np.float64), "lock": threading.Lock()}
    kept: list[pickle.PickleBuffer] = []
    blob = dumps(data, 5, buffer_callback=lambda b: kept.append(b) and False)
    assert len(kept) == 1
    assert len(blob) < 10_000  # the 8 MB array is not in it
    raw = kept[0].raw()
    back = loads(blob, buffers=kept)
    assert np.shares_memory(back["x"], np.frombuffer(raw, dtype=np.float64))
    assert back["lock"].acquire(blocking=False)
    with pytest.raises(pickle.UnpicklingError):
        loads(blob)  # buffers are required
