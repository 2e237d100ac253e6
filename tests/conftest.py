"""Shared pytest configuration for the pushsvc tests.

* Async tests run on uvloop (through pytest-asyncio's loop-factory hook).
* Every async integration test runs under a wall-clock limit (default
  ``DEFAULT_TIME_LIMIT`` seconds, override with ``@pytest.mark.time_limit(s)``).
* Module-scoped fixtures start one Tansu broker and one ``pushsvc serve`` process
  per test module. A module can override ``kafka_topics`` (created before the
  server starts) and ``server_env`` (extra environment for the server).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # make ``import utils`` work in every import mode
    sys.path.insert(0, str(_TESTS_DIR))

from utils import (  # noqa: E402
    STANDARD_TOPICS,
    Broker,
    Server,
    create_topics,
    run_broker,
    run_server,
)

DEFAULT_TIME_LIMIT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "time_limit(seconds): wall-clock limit for an async integration test "
        f"(default {DEFAULT_TIME_LIMIT:g} s)",
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every asyncio test on a uvloop event loop."""
    return {"uvloop": uvloop.new_event_loop}


def _bounded(func: Callable[..., Any], limit: float) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        async with asyncio.timeout(limit):
            return await func(*args, **kwargs)

    return wrapper


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Wrap each async integration test in ``asyncio.timeout``."""
    for item in items:
        if (
            not isinstance(item, pytest.Function)
            or "integration" not in item.path.parts
        ):
            continue
        func = item.obj
        if not inspect.iscoroutinefunction(func):
            continue
        marker = item.get_closest_marker("time_limit")
        limit = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT
        item.obj = _bounded(func, limit)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """An in-memory Tansu broker for the module."""
    with run_broker() as b:
        yield b


@pytest.fixture(scope="module")
def kafka_topics() -> dict[str, int]:
    """Topics (name -> partitions) created before the module's server starts."""
    return dict(STANDARD_TOPICS)


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    """Extra environment for the module's server (None unsets a variable)."""
    return {}


@pytest.fixture(scope="module")
def server(
    broker: Broker, kafka_topics: dict[str, int], server_env: dict[str, Any]
) -> Iterator[Server]:
    """``python -m pushsvc serve`` against ``broker``, ready (``/ready`` is 200)."""
    create_topics(broker.bootstrap, kafka_topics)
    with run_server(broker, **server_env) as s:
        yield s
