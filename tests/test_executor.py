"""``dcproto.Executor`` and the joblib backend "dcproto".

The executor tests follow what CPython's ``test_concurrent_futures`` checks of an executor
(results, map order and timeout, exceptions, shutdown, cancellation, as_completed / wait,
asyncio), on the embedded default (``user_name=None``) and, for a few, on a real server with
real worker processes (the ``user`` fixture: the named server "home"). Functions defined here
travel to the workers by value. No test asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from conftest import wait_for
from joblib import Parallel, delayed, parallel_config

import dcproto
from dcproto import Executor, ExecutorBroken, RemoteCallError, SerializationError
from dcproto.errors import UnsafeResult
from dcproto.users import User

pytestmark = pytest.mark.timeout(90)

T = 30.0  # bound on every wait for a result


def square(x: int) -> int:
    return x * x


def add(x: int, y: int, *, scale: int = 1) -> int:
    return (x + y) * scale


def fail(x: int) -> int:
    raise ValueError(f"bad item {x}")


def fail_if_odd(x: int) -> int:
    if x % 2:
        raise KeyError(x)
    return x


class CustomError(Exception):
    """An exception type of this module: comes back as itself only from trusted workers."""


def fail_custom(text: str) -> None:
    raise CustomError(text)


class Point:
    """A value outside the safe decoder's allow-list."""

    def __init__(self, x: int) -> None:
        self.x = x


def make_point(x: int) -> Point:
    return Point(x)


def return_unpicklable() -> Any:
    import threading

    return threading.Lock()


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def crash() -> None:
    os._exit(3)


def wait_running(future: concurrent.futures.Future[Any]) -> None:
    wait_for(future.running, T, "the call to be handed to the project")


# ---- the embedded default --------------------------------------------------------------------


def test_is_a_concurrent_futures_executor() -> None:
    with Executor() as executor:
        assert isinstance(executor, concurrent.futures.Executor)
        assert executor.max_workers >= 1


def test_submit_and_result() -> None:
    with Executor() as executor:
        assert executor.submit(square, 12).result(T) == 144
        assert executor.submit(add, 2, 3, scale=10).result(T) == 50
        assert executor.submit(pow, 2, 10).result(T) == 1024  # a builtin
        offset = 7
        assert executor.submit(lambda x: x + offset, 1).result(T) == 8  # a closure
        assert executor.submit(functools.partial(add, 1), 2).result(T) == 3
        assert executor.submit(make_point, 5).result(T).x == 5  # trusted: any type
        assert executor.submit(os.getpid).result(T) != os.getpid()  # in a worker's child


def test_map_keeps_the_order() -> None:
    with Executor() as executor:
        items = list(range(40))
        assert list(executor.map(square, items)) == [x * x for x in items]
        assert list(executor.map(add, [1, 2, 3], [10, 20, 30, 40])) == [11, 22, 33]  # shortest
        assert list(executor.map(square, [])) == []


def test_map_with_chunksize_sends_one_task_per_chunk() -> None:
    with Executor() as executor:
        items = list(range(25))
        assert list(executor.map(square, items, chunksize=4)) == [x * x for x in items]
        assert executor.progress.tasks_done == 7  # ceil(25 / 4)
        with pytest.raises(ValueError, match="chunksize"):
            executor.map(square, items, chunksize=0)


def test_map_chunk_with_a_failing_call_fails_only_that_result() -> None:
    with Executor() as executor:
        results = executor.map(fail_if_odd, range(6), chunksize=3)
        assert next(results) == 0
        with pytest.raises(KeyError):
            next(results)
        assert list(executor.map(fail_if_odd, [0, 2, 4], chunksize=3)) == [0, 2, 4]


def test_map_timeout() -> None:
    with Executor() as executor:
        results = executor.map(sleep_then, [0, 2], [1, 2], timeout=0.5)
        with pytest.raises(TimeoutError):
            list(results)
        executor.shutdown(cancel_futures=True)


def test_exception_keeps_its_type_message_and_remote_traceback() -> None:
    with Executor() as executor:
        future = executor.submit(fail, 3)
        with pytest.raises(ValueError, match="bad item 3"):
            future.result(T)
        error = future.exception(T)
        assert type(error) is ValueError
        assert "in fail" in str(error.__cause__)  # the worker's traceback, chained
        custom = executor.submit(fail_custom, "own type").exception(T)
        assert isinstance(custom, CustomError) and str(custom) == "own type"
        assert type(executor.submit(sys.exit, 4).exception(T)) is SystemExit


def test_an_exception_fails_only_its_own_future() -> None:
    with Executor() as executor:
        futures = [executor.submit(fail_if_odd, x) for x in range(6)]
        for x, future in enumerate(futures):
            if x % 2:
                assert isinstance(future.exception(T), KeyError)
            else:
                assert future.result(T) == x
        unpicklable = executor.submit(return_unpicklable)
        with pytest.raises(SerializationError, match="cannot be pickled"):
            unpicklable.result(T)
        assert executor.submit(square, 3).result(T) == 9  # still running


def test_unpicklable_call_fails_its_future() -> None:
    import threading

    lock = threading.Lock()
    with Executor() as executor:
        future = executor.submit(square, lock)
        assert isinstance(future.exception(T), SerializationError)
        assert executor.submit(square, 2).result(T) == 4


def test_cancel_a_pending_future() -> None:
    with Executor(max_workers=1) as executor:
        running = executor.submit(sleep_then, 1, "first")
        wait_running(running)
        pending = executor.submit(square, 2)  # waits behind it: one task out at a time
        assert pending.cancel() is True
        assert pending.cancelled()
        assert running.cancel() is False  # handed to the project: it runs to the end
        after = executor.submit(square, 3)
        assert running.result(T) == "first"
        assert after.result(T) == 9
        with pytest.raises(concurrent.futures.CancelledError):
            pending.result(0)


def test_shutdown_wait_false_returns_at_once_and_calls_finish() -> None:
    executor = Executor(max_workers=1)
    running = executor.submit(sleep_then, 1, "done")
    wait_running(running)
    queued = executor.submit(square, 5)
    executor.shutdown(wait=False)
    assert not running.done()  # it sleeps for a second: shutdown did not wait for it
    assert running.result(T) == "done"
    assert queued.result(T) == 25  # shutdown without cancel_futures runs what was queued


def test_shutdown_cancel_futures_cancels_the_pending_ones() -> None:
    executor = Executor(max_workers=1)
    running = executor.submit(sleep_then, 1, "ran")
    wait_running(running)
    pending = [executor.submit(square, x) for x in range(5)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in pending)
    assert running.result(0) == "ran"


def test_submit_after_shutdown_raises() -> None:
    executor = Executor()
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(square, [1])
    executor.shutdown()  # twice is fine


def test_context_manager_waits_for_the_calls() -> None:
    with Executor() as executor:
        futures = [executor.submit(sleep_then, 0.2, x) for x in range(4)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)


def test_as_completed_and_wait() -> None:
    with Executor() as executor:
        futures = [executor.submit(square, x) for x in range(10)]
        done = concurrent.futures.as_completed(futures, timeout=T)
        assert sorted(f.result() for f in done) == [x * x for x in range(10)]

        slow = executor.submit(sleep_then, 1, "slow")
        failing = executor.submit(fail, 1)
        first = concurrent.futures.wait(
            [slow, failing], timeout=T, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        assert failing in first.done
        everything = concurrent.futures.wait([slow, failing], timeout=T)
        assert everything.done == {slow, failing} and not everything.not_done


async def test_asyncio_wrap_future() -> None:
    with Executor() as executor:
        values = await asyncio.gather(
            *(asyncio.wrap_future(executor.submit(square, x)) for x in range(5))
        )
        assert values == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError, match="bad item 2"):
            await asyncio.wrap_future(executor.submit(fail, 2))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(executor, square, 6) == 36


def test_a_crash_breaks_the_executor() -> None:
    executor = Executor(max_attempts=1)
    future = executor.submit(crash)
    error = future.exception(T)
    assert isinstance(error, ExecutorBroken)
    assert isinstance(error, concurrent.futures.BrokenExecutor)
    with pytest.raises(concurrent.futures.BrokenExecutor):
        executor.submit(square, 1)
    executor.shutdown()


# ---- a named server with real workers ----------------------------------------------------------


def test_named_server_submit_map_and_exceptions(start_worker: Any, user: User) -> None:
    start_worker()
    with Executor("home") as executor:
        assert executor.max_workers == 4  # twice the worker's slots
        assert executor.submit(add, 1, 2, scale=3).result(T) == 9
        assert list(executor.map(square, range(30), chunksize=4)) == [x * x for x in range(30)]
        # untrusted workers: a built-in exception is rebuilt from its plain arguments...
        with pytest.raises(ValueError, match="bad item 7"):
            executor.submit(fail, 7).result(T)
        # ...another type comes back as RemoteCallError naming it
        custom = executor.submit(fail_custom, "remote").exception(T)
        assert isinstance(custom, RemoteCallError)
        assert custom.type_name.endswith("CustomError") and "remote" in str(custom)
        assert "fail_custom" in custom.remote_traceback
        # a value outside the allow-list fails its own future only
        assert isinstance(executor.submit(make_point, 1).exception(T), UnsafeResult)
        assert executor.submit(square, 4).result(T) == 16


def test_named_server_trusted_and_cancel(start_worker: Any, user: User) -> None:
    start_worker("--slots", "1")
    with Executor("home", trust_workers=True) as executor:
        assert executor.max_workers == 2
        assert executor.submit(make_point, 3).result(T).x == 3
        assert isinstance(executor.submit(fail_custom, "x").exception(T), CustomError)
        running = executor.submit(sleep_then, 1, "first")
        wait_running(running)
        pending = executor.submit(square, 2)
        assert pending.cancel() is True
        assert running.result(T) == "first"
        executor.shutdown(cancel_futures=True)


# ---- joblib --------------------------------------------------------------------------------------


def test_import_dcproto_does_not_import_joblib() -> None:
    checks = [
        # dcproto first: the name is registered once joblib is imported, lazily
        "import sys, dcproto\n"
        "assert 'joblib' not in sys.modules, 'joblib imported'\n"
        "import joblib\n"
        "from joblib.parallel import BACKENDS\n"
        "assert 'dcproto' in BACKENDS\n"
        "assert 'dcproto.joblib_backend' not in sys.modules\n",
        # joblib first: registered at once
        "import sys, joblib, dcproto\n"
        "from joblib.parallel import BACKENDS, parallel_config\n"
        "assert 'dcproto' in BACKENDS\n"
        "with parallel_config(backend='dcproto', user_name='home') as config:\n"
        "    assert type(config['backend']).__name__ == 'DcprotoBackend'\n",
    ]
    for code in checks:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


def test_joblib_on_the_embedded_default() -> None:
    with parallel_config(backend="dcproto"):
        assert Parallel(n_jobs=-1)(delayed(square)(x) for x in range(50)) == [
            x * x for x in range(50)
        ]
        with pytest.raises(ValueError, match="bad item 3"):
            Parallel(n_jobs=2)(delayed(fail)(x) for x in [3])
    assert Parallel(backend="dcproto", n_jobs=2)(delayed(add)(x, 1) for x in range(5)) == [
        1,
        2,
        3,
        4,
        5,
    ]


def _grid_search() -> tuple[Any, Any, Any]:
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    X, y = make_classification(n_samples=150, n_features=8, n_informative=4, random_state=0)
    search = GridSearchCV(
        LogisticRegression(max_iter=500),
        {"C": [0.001, 0.01, 0.1, 1.0, 10.0]},
        cv=3,
        n_jobs=-1,
    )
    return search, X, y


def _serial_grid_search() -> tuple[dict[str, Any], list[float]]:
    search, X, y = _grid_search()
    search.set_params(n_jobs=None)
    search.fit(X, y)
    return search.best_params_, list(search.cv_results_["mean_test_score"])


def _count_batches(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The batches joblib hands to the dcproto backend, from now on."""
    from dcproto.joblib_backend import DcprotoBackend

    batches: list[Any] = []
    submit = DcprotoBackend.submit

    def counting(self: DcprotoBackend, func: Any, callback: Any = None) -> Any:
        batches.append(func)
        return submit(self, func, callback)

    monkeypatch.setattr(DcprotoBackend, "submit", counting)
    return batches


def test_grid_search_on_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    expected_params, expected_scores = _serial_grid_search()
    search, X, y = _grid_search()
    batches = _count_batches(monkeypatch)
    with parallel_config(backend="dcproto"):
        search.fit(X, y)
    assert sum(len(batch) for batch in batches) == 15  # 5 candidates x 3 folds, all on dcproto
    assert search.best_params_ == expected_params
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], expected_scores)


def test_grid_search_on_a_named_server(
    start_worker: Any, user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker(), start_worker()
    expected_params, expected_scores = _serial_grid_search()
    search, X, y = _grid_search()
    batches = _count_batches(monkeypatch)
    with parallel_config(backend="dcproto", user_name="home", modules=["sklearn"]):
        search.fit(X, y)
    assert sum(len(batch) for batch in batches) == 15
    assert search.best_params_ == expected_params
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], expected_scores)


def test_dcproto_exports() -> None:
    assert dcproto.Executor is Executor
    assert "Executor" in dcproto.__all__
