"""Tests of `gateway.eventloop`: uvloop when importable, asyncio's loop otherwise.

Both branches run in every environment: uvloop's presence or absence is simulated
through `sys.modules`; one test also checks the real environment, whichever it is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
from collections.abc import Iterator

import pytest

from gateway.eventloop import install_event_loop_policy


class _FakeLoop(asyncio.SelectorEventLoop):
    """Stands for uvloop.Loop: a loop the test can recognise by type."""


class _FakePolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _FakeLoop()


@pytest.fixture(autouse=True)
def restore_policy() -> Iterator[None]:
    original = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(original)


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_uvloop_is_used_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("uvloop")
    fake.EventLoopPolicy = _FakePolicy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    assert install_event_loop_policy() == "uvloop"
    assert asyncio.run(_loop_type()) is _FakeLoop


def test_asyncio_is_kept_when_uvloop_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    before = asyncio.get_event_loop_policy()
    assert install_event_loop_policy() == "asyncio"
    assert asyncio.get_event_loop_policy() is before
    assert not asyncio.run(_loop_type()).__module__.startswith("uvloop")


def test_real_environment_reports_what_is_installed() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    name = install_event_loop_policy()
    assert name == ("uvloop" if installed else "asyncio")
    loop_module = asyncio.run(_loop_type()).__module__
    assert loop_module.startswith("uvloop") == installed
