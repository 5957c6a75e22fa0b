"""Serializer fidelity with cloudpickle (issue 12 item 5).

Errors keep their original type as well as SerializationError; a class's own reduction wins
over compatmp's lock rules; find_unpicklable never raises and is bounded; reopened files keep
``newline=`` and buffering; the failure path does not re-pickle everything many times.
"""

from __future__ import annotations

import copyreg
import io
import multiprocessing
import pickle
import queue
import threading
import time

import pytest

import compatmp
from compatmp import CompatPickler, SerializationError, dumps, find_unpicklable, loads

# --- errors of both types ------------------------------------------------------------------


class RaiserOnPickle:
    def __init__(self, exc):
        self.exc = exc

    def __reduce__(self):
        raise self.exc


class MyError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        RuntimeError("bad state"),
        KeyError("k"),
        OSError(5, "io"),
        UnicodeEncodeError("ascii", "é", 0, 1, "no"),
        MyError(1, "custom"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_is_both_serialization_error_and_the_original_type(exc):
    with pytest.raises(SerializationError) as info:
        dumps({"x": RaiserOnPickle(exc)})
    err = info.value
    assert isinstance(err, type(exc))
    assert isinstance(err, pickle.PicklingError)
    assert isinstance(err, compatmp.CompatMPError)
    assert err.__cause__ is exc
    assert "dataset['x']" in str(err)  # BaseException's str, not KeyError's repr
    assert [u.path for u in err.unpicklable] == ["dataset['x']"]


def _error_of(obj):
    try:
        dumps(obj)
    except SerializationError as exc:
        return exc
    raise AssertionError("did not fail")


def test_dual_types_are_cached_and_travel_through_pickle():
    a = _error_of(i for i in range(1))
    b = _error_of(i for i in range(2))
    assert type(a) is type(b) and isinstance(a, TypeError)
    back = pickle.loads(pickle.dumps(a))
    assert type(back) is type(a) and str(back) == str(a)
    assert [u.path for u in back.unpicklable] == [u.path for u in a.unpicklable]


def test_except_clauses_written_for_cloudpickle_still_catch():
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(RuntimeError, match="inheritance"):
        dumps(ctx.Lock())  # cloudpickle raises RuntimeError here
    with pytest.raises(TypeError, match="generator"):
        dumps(i for i in range(3))
    with pytest.raises(ValueError, match="Unpicklable"):
        dumps(RaiserOnPickle(ValueError("Unpicklable object")))


def test_protocol_is_positional_and_respected():
    blob = dumps({"a": 1}, 2)
    assert blob[:2] == b"\x80\x02"
    assert loads(blob) == {"a": 1}


# --- a class's own reduction wins over the lock rules --------------------------------------


class CountingQueue(queue.Queue):
    """A Queue subclass that says how it pickles: only its maxsize and a tag."""

    def __init__(self, maxsize=0, tag="new"):
        super().__init__(maxsize)
        self.tag = tag

    def __reduce__(self):
        return (CountingQueue, (self.maxsize, "rebuilt by __reduce__"))


class FlagEvent(threading.Event):
    """An Event subclass with __getstate__/__setstate__ that drops its condition."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def __getstate__(self):
        return {"label": self.label, "was_set": self.is_set()}

    def __setstate__(self, state):
        self.__init__(state["label"] + " (setstate)")
        if state["was_set"]:
            self.set()


class PlainQueue(queue.Queue):
    pass


class RegisteredEvent(threading.Event):
    pass


def _rebuild_registered(flag):
    ev = RegisteredEvent()
    ev.tag = "copyreg"
    if flag:
        ev.set()
    return ev


def test_own_reduce_wins_over_queue_rule():
    q = CountingQueue(7)
    q.put("item")
    out = loads(dumps({"q": q}))["q"]
    assert type(out) is CountingQueue
    assert out.tag == "rebuilt by __reduce__"
    assert out.maxsize == 7 and out.empty()  # as its __reduce__ says, not the queue rule


def test_own_getstate_wins_over_event_rule():
    ev = FlagEvent("x")
    ev.set()
    out = loads(dumps(ev))
    assert type(out) is FlagEvent and out.label == "x (setstate)" and out.is_set()


def test_copyreg_entry_wins_over_event_rule():
    copyreg.pickle(RegisteredEvent, lambda ev: (_rebuild_registered, (ev.is_set(),)))
    try:
        ev = RegisteredEvent()
        ev.set()
        out = loads(dumps(ev))
        assert out.tag == "copyreg" and out.is_set()
    finally:
        del copyreg.dispatch_table[RegisteredEvent]


def test_subclass_without_own_reduction_still_gets_the_rule():
    q = PlainQueue(3)
    q.put(1)
    ev = RegisteredEvent()  # not registered in this test: a plain subclass
    ev.set()
    out, out_ev = loads(dumps((q, ev)))
    assert type(out) is PlainQueue and out.get_nowait() == 1 and out.maxsize == 3
    assert type(out_ev) is threading.Event and out_ev.is_set()  # the event rule's result


# --- find_unpicklable never raises ---------------------------------------------------------


class RecursiveGetattribute:
    def __getattribute__(self, name):
        return self.__getattribute__(name)  # recurses forever


class RaisingProperty:
    def __init__(self):
        self.gen = (i for i in range(1))

    @property
    def __dict__(self):  # on purpose: looking at the object raises
        raise RuntimeError("no dict for you")


def test_find_unpicklable_survives_recursing_getattribute():
    found = find_unpicklable({"bad": RecursiveGetattribute()})
    assert [u.path for u in found] == ["dataset['bad']"]
    assert found[0].type_name.endswith("RecursiveGetattribute")
    with pytest.raises(SerializationError):
        dumps(RecursiveGetattribute())


def test_find_unpicklable_survives_raising_properties():
    found = find_unpicklable([RaisingProperty()])
    assert [u.path for u in found] and found[0].path.startswith("dataset[0]")


def test_find_unpicklable_is_bounded_on_huge_failing_containers():
    data = [(i, (j for j in range(1))) for i in range(50_000)]  # 50,000 generators
    start = time.monotonic()
    found = find_unpicklable(data)
    assert time.monotonic() - start < 30  # the budget is ~1 s + 3 pickles; 30 s for load
    assert 1 <= len(found) <= 20
    assert found[0].path == "dataset[0][1]"
    with pytest.raises(SerializationError, match="may be more"):
        dumps(data)


def test_find_unpicklable_is_bounded_in_depth():
    deep: list = [(i for i in range(1))]
    for _ in range(200):
        deep = [deep]
    found = find_unpicklable(deep)
    assert len(found) == 1 and found[0].path.startswith("dataset[0][0]")


# --- reopened files keep newline and buffering --------------------------------------------


@pytest.mark.parametrize("newline", [None, "", "\n", "\r", "\r\n"])
def test_reopened_text_file_keeps_newline(tmp_path, newline):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"head\r\na\r\nb\rc\nd\r\n")
    with open(path, encoding="utf-8", newline=newline) as f:
        f.readline()
        expected = f.read()
        f.seek(0)
        f.readline()
        f.tell()  # tell() itself re-decodes and resets f.newlines (CPython's textio.c)
        seen = f.newlines
        out = loads(dumps(f))
        assert f.newlines == seen  # looking at the newline mode did not change it
    with out:
        assert out.read() == expected


def test_reopened_files_keep_buffering(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 10)
    with open(path, "rb", buffering=0) as raw, open(path, "rb", buffering=1000) as buf:
        raw.read(3)
        buf.read(5)
        size = type(buf).__sizeof__(buf)  # CPython: the object plus its 1000-byte buffer
        out_raw, out_buf = loads(dumps((raw, buf)))
    with out_raw, out_buf:
        assert isinstance(out_raw, io.FileIO) and out_raw.tell() == 3
        assert out_buf.read(1) == bytes([5])
        assert type(out_buf).__sizeof__(out_buf) == size
    with open(path, encoding="latin-1", buffering=1) as text:
        out_text = loads(dumps(text))
    with out_text:
        assert out_text.line_buffering


def test_closed_file_error_uses_cloudpickles_wording(tmp_path):
    f = open(tmp_path / "c.txt", "w")
    f.close()
    with pytest.raises(pickle.PicklingError, match="Cannot pickle closed files"):
        dumps(f)


# --- the failure path is cheap -------------------------------------------------------------


def test_failure_path_costs_a_few_failed_pickles():
    np = pytest.importorskip("numpy")

    class Record:
        def __init__(self, i):
            self.path = f"/data/{i:06d}.png"
            self.meta = {"w": 64, "h": 64}

    data = {
        "images": np.zeros((2000, 32, 32, 3), np.uint8),
        "records": [Record(i) for i in range(20_000)],
        "lock": threading.Lock(),
    }
    for r in data["records"][::100]:
        r.stream = (j for j in range(1))
    calls = 0
    original = CompatPickler.dump

    def counting_dump(self, obj):
        nonlocal calls
        calls += 1
        return original(self, obj)

    CompatPickler.dump = counting_dump
    try:
        with pytest.raises(SerializationError):
            dumps(data)
    finally:
        CompatPickler.dump = original
    # before: one pickler per record (20,000+); now groups of 64 and at most 20 culprits
    assert calls < 2_000
