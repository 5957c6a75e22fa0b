"""Tests for compatmp._threadsafe: threadsafe_iter and threadsafe_generator.

Every concurrency claim is checked twice: once that the wrapper gets it right, and once (a
control) that the same situation really breaks without it, so no test passes vacuously.
"""

from __future__ import annotations

import collections
import pickle
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from compatmp._threadsafe import threadsafe_generator, threadsafe_iter

N_ITEMS = 20_000
N_THREADS = 8
# The generator releases the GIL (time.sleep(0)) every this many items while its frame is
# running, which lets another thread call next() on it mid-item. Measured on the 2-core dev
# machine: the unlocked drain raises "generator already executing" in 10 of 10 attempts, and
# the locked drain of 20 000 items takes ~0.05 s (every=1 makes it ~1.8 s for no extra value).
SLEEP_EVERY = 100
# Generous bound for a thread to reach a point or finish, in seconds: a 2-core machine shared
# with other jobs can stall a thread for a long time; reaching it means a deadlock.
WAIT_S = 10.0
# How long a thread that must be blocked is given to (wrongly) finish, in seconds. An unlocked
# next() on a running generator fails within microseconds, so 0.2 s is ample to observe it.
SETTLE_S = 0.2
# Attempts the probabilistic control gets to see the race (it saw it on the first in 10 of 10).
CONTROL_ATTEMPTS = 20


def slow_numbers(n: int, every: int = SLEEP_EVERY) -> Iterator[int]:
    """Yield 0..n-1, releasing the GIL inside the generator frame every ``every`` items."""
    for i in range(n):
        if i % every == 0:
            time.sleep(0)
        yield i


class BrokenRecipe:
    """The widely copied Python 3 port of the keras#1638 recipe: it has a lock, never takes it."""

    def __init__(self, it: Iterator[int]) -> None:
        self.it = it
        self.lock = threading.Lock()

    def __iter__(self) -> BrokenRecipe:
        return self

    def __next__(self) -> int:
        return next(self.it)  # the bug: no `with self.lock:`


def drain(
    it: Iterator[int], n_threads: int = N_THREADS
) -> tuple[list[list[int]], list[BaseException]]:
    """Let ``n_threads`` threads run ``for x in it`` at once; return each one's items and errors."""
    start = threading.Barrier(n_threads)
    results: list[list[int]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        start.wait(WAIT_S)
        try:
            for x in it:
                results[k].append(x)
        except BaseException as exc:  # recorded and asserted on by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a draining thread is stuck (deadlock?)"
    return results, errors


class Gate:
    """A generator that stops inside its frame on item 0 until released, to force the race."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finalized = threading.Event()

    def gen(self) -> Iterator[int]:
        try:
            self.entered.set()
            assert self.release.wait(WAIT_S), "test never released the gate"
            yield 0
            yield 1
            yield 2
        finally:
            self.finalized.set()


def call_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict, threading.Event]:
    """Run ``fn`` in a daemon thread; return it, a dict that gets "value" or "error", and done."""
    out: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out, done


# --------------------------------------------------------------------------------------------
# Many threads draining one generator
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_eight_threads_get_every_item_exactly_once() -> None:
    results, errors = drain(threadsafe_iter(slow_numbers(N_ITEMS)))

    assert errors == []
    got = collections.Counter(x for r in results for x in r)
    assert got == collections.Counter(range(N_ITEMS))
    # Every thread saw a strictly increasing subsequence: items are handed out in order.
    for r in results:
        assert r == sorted(r)


@pytest.mark.timeout(120)
def test_control_broken_recipe_races_under_the_same_drain() -> None:
    """Without the lock the same drain raises ValueError, so the test above can fail."""
    for _attempt in range(CONTROL_ATTEMPTS):
        _, errors = drain(BrokenRecipe(slow_numbers(N_ITEMS)))
        if errors:
            break
    assert errors, f"no race seen in {CONTROL_ATTEMPTS} attempts; the control is too weak"
    assert all(isinstance(e, ValueError) for e in errors), errors
    assert "generator already executing" in str(errors[0])


@pytest.mark.timeout(60)
def test_decorated_generator_drained_by_eight_threads() -> None:
    numbers = threadsafe_generator(slow_numbers)
    results, errors = drain(numbers(N_ITEMS))

    assert errors == []
    assert collections.Counter(x for r in results for x in r) == collections.Counter(range(N_ITEMS))


# --------------------------------------------------------------------------------------------
# Deterministic: a second next() while the generator is running in another thread
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "wrap", [lambda g: g, BrokenRecipe], ids=["bare-generator", "broken-recipe"]
)
def test_control_second_next_while_running_raises(wrap: Callable) -> None:
    gate = Gate()
    it = wrap(gate.gen())
    first, first_out, _ = call_in_thread(lambda: next(it))
    assert gate.entered.wait(WAIT_S)

    with pytest.raises(ValueError, match="generator already executing"):
        next(it)

    gate.release.set()
    first.join(WAIT_S)
    assert first_out == {"value": 0}


@pytest.mark.timeout(30)
def test_second_next_waits_for_the_running_one_then_gets_the_next_item() -> None:
    gate = Gate()
    it = threadsafe_iter(gate.gen())
    first, first_out, _ = call_in_thread(lambda: next(it))
    assert gate.entered.wait(WAIT_S)

    second, second_out, second_done = call_in_thread(lambda: next(it))
    # Unlocked, the second call fails at once; locked, it must still be waiting.
    assert not second_done.wait(SETTLE_S), f"second next() did not wait: {second_out}"

    gate.release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert first_out == {"value": 0}
    assert second_out == {"value": 1}


@pytest.mark.timeout(30)
def test_close_waits_for_the_running_next_then_finalizes() -> None:
    gate = Gate()
    it = threadsafe_iter(gate.gen())
    first, first_out, _ = call_in_thread(lambda: next(it))
    assert gate.entered.wait(WAIT_S)

    closer, closer_out, closer_done = call_in_thread(it.close)
    assert not closer_done.wait(SETTLE_S), f"close() did not wait: {closer_out}"
    assert not gate.finalized.is_set()

    gate.release.set()
    first.join(WAIT_S)
    closer.join(WAIT_S)
    assert first_out == {"value": 0}
    assert closer_out == {"value": None}
    assert gate.finalized.is_set()
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.timeout(30)
def test_control_bare_generator_close_while_running_raises() -> None:
    gate = Gate()
    gen = gate.gen()
    first, _, _ = call_in_thread(lambda: next(gen))
    assert gate.entered.wait(WAIT_S)

    with pytest.raises(ValueError, match="generator already executing"):
        gen.close()

    gate.release.set()
    first.join(WAIT_S)
    gen.close()


# --------------------------------------------------------------------------------------------
# End of iteration and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stop_iteration_reaches_every_thread() -> None:
    it = threadsafe_iter(slow_numbers(1000))
    stops = []
    lock = threading.Lock()
    start = threading.Barrier(N_THREADS)

    def run() -> None:
        start.wait(WAIT_S)
        while True:
            try:
                next(it)
            except StopIteration:
                with lock:
                    stops.append(threading.get_ident())
                return

    threads = [threading.Thread(target=run, daemon=True) for _ in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert len(stops) == N_THREADS
    assert len(set(stops)) == N_THREADS
    with pytest.raises(StopIteration):
        next(it)


def failing_after(n: int) -> Iterator[int]:
    """Yield 0..n-1 (releasing the GIL), then raise RuntimeError."""
    for i in range(n):
        time.sleep(0)
        yield i
    raise RuntimeError("boom from the generator")


@pytest.mark.timeout(30)
def test_exception_goes_to_one_thread_and_others_stop_cleanly() -> None:
    results, errors = drain(threadsafe_iter(failing_after(500)))

    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert str(errors[0]) == "boom from the generator"
    assert collections.Counter(x for r in results for x in r) == collections.Counter(range(500))


@pytest.mark.timeout(30)
def test_reentrant_next_raises_instead_of_deadlocking() -> None:
    holder: list[threadsafe_iter[int]] = []

    def reentrant() -> Iterator[int]:
        yield 0
        yield next(holder[0])  # the generator advancing its own wrapper

    it = threadsafe_iter(reentrant())
    holder.append(it)
    assert next(it) == 0
    # Run in a thread so that a deadlock fails the test instead of hanging it.
    t, out, done = call_in_thread(lambda: next(it))
    assert done.wait(WAIT_S), "re-entrant next() deadlocked"
    t.join(WAIT_S)
    assert isinstance(out.get("error"), ValueError)
    assert "generator already executing" in str(out["error"])


# --------------------------------------------------------------------------------------------
# Plain behaviour, send, non-generator iterables
# --------------------------------------------------------------------------------------------


def test_iter_returns_self_and_wraps_any_iterable() -> None:
    it = threadsafe_iter([3, 1, 2])
    assert iter(it) is it
    assert list(it) == [3, 1, 2]
    assert list(it) == []  # one shared iterator, consumed once

    class Squares:
        def __getitem__(self, i: int) -> int:
            if i >= 4:
                raise IndexError(i)
            return i * i

    assert list(threadsafe_iter(Squares())) == [0, 1, 4, 9]
    assert isinstance(threadsafe_iter(iter(())), Iterator)


def test_send_forwards_to_the_generator() -> None:
    def echo() -> Iterator[str]:
        received = yield "ready"
        while True:
            received = yield f"got {received}"

    it = threadsafe_iter(echo())
    assert next(it) == "ready"
    assert it.send(5) == "got 5"
    assert it.send("x") == "got x"


def test_send_on_a_non_generator_says_what_to_do() -> None:
    it = threadsafe_iter([1, 2])
    with pytest.raises(TypeError, match=r"list_iterator.*Use next\(\) instead"):
        it.send(1)


def test_close_on_an_iterator_without_close_is_a_no_op() -> None:
    it = threadsafe_iter([1, 2])
    it.close()
    assert list(it) == [1, 2]


def test_wrapped_generator_is_not_picklable() -> None:
    """Documented: threads only; a generator (and so its wrapper) cannot cross processes."""
    with pytest.raises(TypeError):
        pickle.dumps(threadsafe_iter(slow_numbers(3)))


# --------------------------------------------------------------------------------------------
# Decorator
# --------------------------------------------------------------------------------------------


def test_decorator_preserves_metadata_and_passes_arguments() -> None:
    @threadsafe_generator
    def countdown(start: int, *, step: int = 1) -> Iterator[int]:
        """Count down from start."""
        yield from range(start, 0, -step)

    assert countdown.__name__ == "countdown"
    assert countdown.__doc__ == "Count down from start."
    assert countdown.__qualname__.endswith("countdown")
    assert callable(countdown.__wrapped__)

    a = countdown(6, step=2)
    b = countdown(6, step=2)
    assert isinstance(a, threadsafe_iter)
    assert a is not b
    assert list(a) == [6, 4, 2]
    assert list(b) == [6, 4, 2]  # each call gets its own generator


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, None, 3.5, object()])
def test_non_iterable_is_a_type_error_naming_what_was_received(bad: object) -> None:
    with pytest.raises(TypeError, match="needs an iterable or iterator") as info:
        threadsafe_iter(bad)  # type: ignore[arg-type]
    assert type(bad).__qualname__ in str(info.value)


def test_generator_function_instead_of_generator_says_to_call_it() -> None:
    with pytest.raises(TypeError, match=r"generator function slow_numbers.*Call it first"):
        threadsafe_iter(slow_numbers)  # type: ignore[arg-type]


def test_decorator_on_non_callable_suggests_threadsafe_iter() -> None:
    with pytest.raises(
        TypeError, match=r"received builtins\.generator .*use threadsafe_iter\(obj\)"
    ):
        threadsafe_generator(slow_numbers(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"received builtins\.int 5, which is not callable"):
        threadsafe_generator(5)  # type: ignore[arg-type]


def test_decorated_function_returning_non_iterable_raises_type_error() -> None:
    @threadsafe_generator
    def not_a_generator() -> int:  # type: ignore[misc]
        return 42

    with pytest.raises(TypeError, match=r"received builtins\.int 42"):
        not_a_generator()
