"""Shared pytest fixtures, and the package tests' inputs made before the first test."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from tests.support.package_inputs import Inputs, prepare, wanted

if TYPE_CHECKING:
    from tests.fakenvml import FakeNvml

PACKAGE_INPUTS = pytest.StashKey[Inputs]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the .deb and the Debian roots the selected tests use, outside any test's timeout
    (tests/support/package_inputs.py says why)."""
    config = session.config
    needed = set() if config.option.collectonly else wanted(i.fixturenames for i in session.items)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    config.stash[PACKAGE_INPUTS] = prepare(needed, say)


def pytest_sessionfinish(session: pytest.Session) -> None:
    inputs = session.config.stash.get(PACKAGE_INPUTS, None)
    if inputs is not None and inputs.workdir is not None:
        shutil.rmtree(inputs.workdir, ignore_errors=True)


def package_inputs(config: pytest.Config, name: str) -> Inputs:
    """The session's package inputs for a fixture named ``name``: skipped (or failed under CI)
    when this machine cannot make them, failed with the reason when making them failed."""
    inputs = config.stash[PACKAGE_INPUTS]
    if inputs.unavailable:
        unavailable(inputs.unavailable)
    if name in inputs.errors:
        pytest.fail(f"{name} could not be made before the tests:\n{inputs.errors[name]}")
    return inputs


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short scratch directory under /tmp.

    Unix socket paths must fit in 108 bytes and pytest's tmp_path is often longer than that,
    so everything that binds a socket (fake kubelet, plugins, gpud's control socket) lives here.
    """
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="gpud-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_nvml() -> Iterator[Callable[[FakeNvml], FakeNvml]]:
    """Install a fake ``libnvidia-ml`` under pynvml: ``fake = fake_nvml(dgx_a100())``.

    pynvml is restored afterwards (no library, empty function cache), and any Python error raised
    inside a fake NVML function (which ctypes would otherwise swallow) fails the test.
    """
    from tests.fakenvml import installed

    stack = contextlib.ExitStack()
    fakes: list[FakeNvml] = []

    def install(fake: FakeNvml) -> FakeNvml:
        fakes.append(stack.enter_context(installed(fake)))
        return fake

    with stack:
        yield install
    for fake in fakes:
        assert not fake.internal_errors, f"fake NVML raised: {fake.internal_errors!r}"


SHARED_FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
SHARED_REFERENCE = SHARED_FIXTURES.parent / "reference"


def unavailable(why: str) -> NoReturn:
    """Something a test needs is not on this machine: a failure under CI, which always has it
    (scripts/setup installs it, shared/ lies beside the clone, the runner is root), and a skip
    saying why on a developer's machine that lacks it."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must have it)")
    pytest.skip(why)


def shared_fixture(name: str) -> Path:
    """A file from the ecosystem (shared/fixtures beside the checkout) that gpud must read as is.

    CI always has shared/ beside its clone, so there a missing file fails the test; only a bare
    clone elsewhere skips, saying why.
    """
    path = SHARED_FIXTURES / name
    if not path.exists():
        unavailable(f"{path} is not beside this checkout")
    return path


def shared_reference(name: str) -> Path:
    """A file of facts (shared/reference beside the checkout) that gpud's tables are checked
    against; missing, as :func:`shared_fixture`."""
    path = SHARED_REFERENCE / name
    if not path.exists():
        unavailable(f"{path} is not beside this checkout")
    return path
