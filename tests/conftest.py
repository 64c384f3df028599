"""Shared fixtures. Every test runs with KTUTORIAL_HOME in a temp folder, so no test reads
or writes the reader's own cache, run state or settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _ktutorial_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ktutorial-home")
    old = os.environ.get("KTUTORIAL_HOME")
    os.environ["KTUTORIAL_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("KTUTORIAL_HOME", None)
    else:
        os.environ["KTUTORIAL_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model(_ktutorial_home):
    """The tiny MiniMax-M2 model (seed 0), generated once per session in the temp home."""
    from ktutorial import tiny

    return tiny.ensure(seed=0)


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    """llama.cpp serving the tiny model, one per test module that uses it, stopped after the module."""
    from ktutorial import server

    with server.serve("tiny", threads=1) as srv:
        yield srv
    assert not srv.is_alive()
