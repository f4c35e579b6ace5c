"""The package tests' slow inputs, made once per session before the first test starts.

Building the .deb (every supported CPython's modules: minutes) and debootstrapping the Debian
roots (a minute each, the first time) must not count against pytest-timeout's per-test limit:
on a loaded machine they would exceed it and every package test would fail in setup. So
tests/conftest.py calls :func:`prepare` from ``pytest_collection_finish``, when the selected
tests are known and before any runs, and only for what they ask for (the fixtures ``deb``,
``debian12_root``, ``debian13_root``). Each step has its own bound; what failed is kept and
reported by the fixtures of the tests that needed it, so the rest of the suite still runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scripts.deb_payload import BuildError, find_pythons
from tests.support.debroot import DEBIAN_12, DEBIAN_13, ensure_root

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache/debroot"
# The build runs pip for four CPythons and compiles systemd-python for each: ~2.5 min idle.
BUILD_TIMEOUT = 1800.0
NEEDS = {
    "deb": ("dpkg-buildpackage", "dh", "dpkg-deb"),
    "debian12_root": ("debootstrap",),
    "debian13_root": ("debootstrap",),
}
ROOTS = {"debian12_root": DEBIAN_12, "debian13_root": DEBIAN_13}


@dataclass
class Inputs:
    """What was made (the .deb under ``workdir``, removed after the session), or why not:
    ``unavailable`` when this machine lacks a tool (a skip, or a failure under CI), ``errors``
    when making it failed."""

    workdir: Path | None = None
    deb: Path | None = None
    upgrade: Path | None = None
    roots: dict[str, Path] = field(default_factory=dict)
    unavailable: str = ""
    errors: dict[str, str] = field(default_factory=dict)


def wanted(fixture_names: Iterable[Iterable[str]]) -> set[str]:
    """The inputs the selected tests use (each test's fixture closure)."""
    return {name for names in fixture_names for name in names if name in NEEDS}


def prepare(needed: set[str], say: Callable[[str], None]) -> Inputs:
    inputs = Inputs()
    tools = sorted({tool for name in needed for tool in NEEDS[name]})
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        inputs.unavailable = f"missing {', '.join(missing)} (scripts/setup installs them)"
    elif os.geteuid() != 0:
        inputs.unavailable = "needs root (dpkg-buildpackage, debootstrap and systemd-nspawn)"
    elif "deb" in needed:
        try:
            find_pythons({})
        except BuildError as exc:
            inputs.unavailable = str(exc)
    if inputs.unavailable or not needed:
        return inputs

    jobs: dict[str, Callable[[], object]] = {}
    if "deb" in needed:
        out = inputs.workdir = Path(tempfile.mkdtemp(prefix="gpud-deb-"))
        jobs["deb"] = lambda: _build(out, inputs)
    for name, suite in ROOTS.items():
        if name in needed:
            jobs[name] = lambda suite=suite: inputs.roots.setdefault(
                suite, ensure_root(CACHE, suite)
            )
    say(f"package tests: making {', '.join(jobs)} once, before the tests (minutes the first time)")
    started = time.monotonic()
    # Concurrent: the build waits on the package index, debootstrap on the Debian mirror.
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    for name, future in futures.items():
        if future.exception() is not None:
            inputs.errors[name] = str(future.exception())
    done = "ready" if not inputs.errors else f"failed: {', '.join(inputs.errors)}"
    say(f"package tests: inputs {done} in {time.monotonic() - started:.0f} s")
    return inputs


def _build(out: Path, inputs: Inputs) -> None:
    try:
        result = subprocess.run(
            [str(ROOT / "scripts/build-deb"), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"scripts/build-deb did not finish in {BUILD_TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        raise RuntimeError(
            f"scripts/build-deb exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    inputs.deb = Path(result.stdout.strip().splitlines()[-1])
    inputs.upgrade = upgrade_of(inputs.deb, out / "upgrade")


def upgrade_of(deb: Path, work: Path) -> Path:
    """The same package with a higher version: what an upgrade replaces it with."""
    tree = work / "tree"
    work.mkdir(parents=True)
    subprocess.run(
        ["dpkg-deb", "--raw-extract", str(deb), str(tree)], check=True, capture_output=True
    )
    control = tree / "DEBIAN/control"
    text = control.read_text()
    version = re.search(r"(?m)^Version: (.*)$", text)
    assert version is not None, text
    upgraded = f"{version.group(1)}+upgrade1"
    control.write_text(text.replace(version.group(0), f"Version: {upgraded}"))
    new = work / deb.name.replace(f"_{version.group(1)}_", f"_{upgraded}_")
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(new)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    return new
