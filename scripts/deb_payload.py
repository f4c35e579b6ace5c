#!/usr/bin/env python3
"""Assembles /usr/lib/gpud, the Python payload of the gpud .deb, for every supported CPython.

One package has to run on Ubuntu 22.04 (python3 3.10), Debian 12 (3.11), Ubuntu 24.04 (3.12) and
Debian 13 (3.13), and keep running when a release upgrade changes python3 underneath it. gpud
and the pure-Python distributions work on all four unchanged; the distributions with extension
modules (grpcio, pydantic-core, PyYAML, systemd-python) are built for one CPython ABI each. So the
payload holds::

    common/        gpud, and every distribution whose installed files are the same for all four
    cp310/ … cp313/  every other distribution, complete, once per ABI

and the entry points (packaging/entry-point.in) put ``cp3XY`` of the running python3, then
``common``, on ``sys.path``. Which distribution goes where is not a list kept by hand: each is
installed for every ABI and lands in ``common`` when its RECORD (names and hashes of all its
files) is identical everywhere; a pure or ``abi3`` wheel (protobuf) ends up there by itself.

Wheels come hash-checked from packaging/requirements.lock, fetched for each ABI with pip's
``--python-version/--abi/--platform`` and limited to manylinux tags of the oldest supported
glibc. A distribution that publishes no wheels (systemd-python) is built from its hash-checked
sdist by that CPython itself, which therefore has to be on the build machine with its headers.

    deb_payload.py find [--python X.Y=PATH ...]   print X.Y=PATH for every supported CPython
    deb_payload.py depends                        the package's python3 dependency
    deb_payload.py build --dest DIR [--python X.Y=PATH ...]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "packaging/requirements.lock"
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
# Wheels must load on the oldest supported release's glibc: Ubuntu 22.04's 2.35 (Debian 12 has
# 2.36), so no wheel built for a newer glibc is taken even where the build machine has one.
GLIBC_FLOOR = 35
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
# The names manylinux had before PEP 600, as the glibc they stand for.
LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
# Files in a wheel that are no module of it: left out, with their RECORD lines, so that nothing
# named like them can be shadowed and the package holds only what runs.
STRAY = {
    "nvidia-ml-py": ("example.py",),  # NVIDIA's sample program, installed as a top-level module
}
# Metadata pip writes that can only carry the build machine's paths.
BUILD_ONLY = ("direct_url.json",)
PIP_QUIET = ("--disable-pip-version-check", "--no-input", "--no-cache-dir", "--quiet")


class BuildError(RuntimeError):
    """The payload cannot be built here; the message says what is missing and how to fix it."""


# --- decisions ------------------------------------------------------------------------------------


def abi_tag(version: str) -> str:
    """``3.12`` -> ``cp312``: the directory the entry points look for."""
    major, minor = version.split(".")
    return f"cp{major}{minor}"


def depends(supported: Sequence[str] = SUPPORTED) -> str:
    """The python3 range the payload carries modules for, as a Debian relation."""
    major, last = supported[-1].split(".")
    return f"python3 (>= {supported[0]}~), python3 (<< {major}.{int(last) + 1})"


def platform_tags(machine: str, floor: int = GLIBC_FLOOR) -> list[str]:
    """Every manylinux platform tag a wheel may carry to load on glibc 2.``floor``."""
    oldest = 17 if machine == "aarch64" else 5  # no aarch64 manylinux before 2014
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(floor, oldest - 1, -1)]
    tags += [f"{alias}_{machine}" for alias, minor in LEGACY_MANYLINUX.items() if minor >= oldest]
    return tags


def split_lock(text: str, from_source: Iterable[str]) -> tuple[str, str]:
    """The lock's entries installed from wheels, and those built from source (whole entries,
    hashes and all, so pip's --require-hashes still checks every file)."""
    wanted = {_normal(name) for name in from_source}
    wheels, sources = [], []
    for block in re.split(r"(?m)^(?=[A-Za-z0-9])", text):
        name = re.match(r"([A-Za-z0-9_.-]+)==", block)
        if name is None:
            continue
        (sources if _normal(name.group(1)) in wanted else wheels).append(block)
    return "".join(wheels), "".join(sources)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def common_distributions(records: Mapping[str, Mapping[str, bytes]]) -> set[str]:
    """The distributions that are the same for every ABI: installed for all of them, with the
    same RECORD. ``records`` maps an ABI to its distributions' RECORD contents."""
    abis = list(records.values())
    return {
        dist
        for dist, record in abis[0].items()
        if all(other.get(dist) == record for other in abis[1:])
    }


def common_top_levels(owners: Mapping[str, set[str]], shared: set[str]) -> set[str]:
    """The top-level names that go to ``common``: those that only shared distributions install
    into. ``owners`` maps each distribution to its top-level names; two distributions may share
    one (lightkube-models installs into lightkube's ``lightkube/models``), and it moves once."""
    tops: dict[str, set[str]] = {}
    for dist, names in owners.items():
        for name in names:
            tops.setdefault(name, set()).add(dist)
    return {name for name, dists in tops.items() if dists <= shared}


# --- interpreters ---------------------------------------------------------------------------------


PROBE = """\
import os, sys, sysconfig
try:
    import pip
except ImportError:
    pip = None
headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
print("%d.%d" % sys.version_info[:2], sys.implementation.name, headers, pip is not None)
print(sys.executable)
"""


@dataclass(frozen=True)
class Python:
    version: str
    path: Path

    @property
    def abi(self) -> str:
        return abi_tag(self.version)


def _probe(path: Path, version: str) -> Path | str:
    """The interpreter ``path`` runs (a pyenv shim names another), or why it cannot build for
    ``version``."""
    try:
        out = subprocess.run(
            [str(path), "-I", "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        return str(exc)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or [f"exited {out.returncode}"])[-1]
    found, implementation, headers, pip, executable = out.stdout.split(maxsplit=4)
    if found != version or implementation != "cpython":
        return f"is {implementation} {found}"
    if headers != "True":
        return f"no Python.h (the python{version}-dev package)"
    if pip != "True":
        return "no pip"
    return Path(executable.strip())


def candidates(version: str, path_env: str, pyenv_root: Path) -> list[Path]:
    """Where a CPython ``version`` may be, in order: ``pythonX.Y`` in every PATH directory (a
    pyenv shim answers only for the active versions, so all are tried), then pyenv's installs,
    newest patch release first."""
    found = [Path(d) / f"python{version}" for d in path_env.split(os.pathsep) if d]
    installs = sorted(
        (
            p
            for p in pyenv_root.glob(f"versions/{version}.*")
            if re.fullmatch(r"\d+\.\d+\.\d+", p.name)
        ),
        key=lambda p: int(p.name.rsplit(".", 1)[1]),
        reverse=True,
    )
    found += [p / "bin" / f"python{version}" for p in installs]
    return [p for p in dict.fromkeys(found) if p.exists()]


def locate(version: str, given: Path | None = None) -> tuple[Path | None, str]:
    """A CPython ``version`` with headers and pip (``given``, else found), or None and what was
    tried."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    tried = [given] if given else candidates(version, os.environ.get("PATH", ""), pyenv_root)
    reasons = []
    for path in tried:
        found = _probe(path, version)
        if isinstance(found, Path):
            return found, ""
        reasons.append(f"{path}: {found}")
    return None, "; ".join(reasons) or f"no python{version} on PATH or in pyenv"


def find_pythons(given: Mapping[str, Path]) -> list[Python]:
    """A CPython with headers and pip for every supported version, or a BuildError naming each
    one missing, what was tried and how to provide it."""
    found, missing = [], []
    for version in SUPPORTED:
        path, why = locate(version, given.get(version))
        if path is None:
            missing.append(f"  CPython {version}: {why}")
        else:
            found.append(Python(version, path))
    if missing:
        raise BuildError(
            "the gpud package carries compiled modules for CPython "
            f"{', '.join(SUPPORTED)} and builds them with each of them, with its headers and pip."
            " Missing:\n" + "\n".join(missing) + "\nInstall them (pyenv install 3.X, or the "
            "python3.X-dev and python3-pip packages where the release has them), or name them: "
            "scripts/build-deb --python 3.X=/path/to/python3.X"
        )
    return found


def parse_given(specs: Iterable[str]) -> dict[str, Path]:
    """``X.Y=PATH`` arguments (and the GPUD_PYTHONS variable build-deb passes to the build)."""
    given = {}
    for spec in specs:
        version, sep, path = spec.partition("=")
        if not sep or version not in SUPPORTED:
            raise BuildError(f"--python {spec}: expected X.Y=PATH with X.Y one of {SUPPORTED}")
        given[version] = Path(path)
    return given


# --- effects --------------------------------------------------------------------------------------


def _run(args: Sequence[str | Path], env: Mapping[str, str] | None = None) -> None:
    cmd = [str(a) for a in args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, check=False)
    print(f"  ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    if result.returncode != 0:
        raise BuildError(f"{cmd[0]} exited {result.returncode}: {' '.join(cmd)}")


def _records(stage: Path) -> dict[str, bytes]:
    return {d.name: (d / "RECORD").read_bytes() for d in stage.glob("*.dist-info")}


def _record_paths(dist_info: Path) -> list[str]:
    rows = csv.reader(io.StringIO((dist_info / "RECORD").read_text()))
    return [row[0] for row in rows if row]


def _top_levels(dist_info: Path) -> set[str]:
    return {path.split("/", 1)[0] for path in _record_paths(dist_info)}


def _digest(data: bytes) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={raw}"


def _drop(dist_info: Path, relpaths: Iterable[str]) -> None:
    """Delete files of a distribution, and their lines in its RECORD and top_level.txt. Lines
    for files outside the directory (console scripts, which _tidy removes) go too."""
    site = dist_info.parent
    rows = list(csv.reader(io.StringIO((dist_info / "RECORD").read_text())))
    drop = {*relpaths, *(r[0] for r in rows if r and r[0].startswith("../"))}
    if not drop:
        return
    for rel in drop:
        if not rel.startswith("../"):
            (site / rel).unlink(missing_ok=True)
    modules = {Path(rel).stem for rel in drop if "/" not in rel and rel.endswith(".py")}
    top_level = dist_info / "top_level.txt"
    if modules and top_level.exists():
        lines = [n for n in top_level.read_text().splitlines() if n not in modules]
        data = ("\n".join(lines) + "\n").encode()
        top_level.write_bytes(data)
        rel = f"{dist_info.name}/top_level.txt"
        rows = [[rel, _digest(data), str(len(data))] if r and r[0] == rel else r for r in rows]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(r for r in rows if r and r[0] not in drop)
    (dist_info / "RECORD").write_text(out.getvalue())


def _tidy(site: Path) -> None:
    """What pip leaves in a --target directory that is not the distributions' modules."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    for dist_info in site.glob("*.dist-info"):
        name = _normal(dist_info.name.split("-", 1)[0])
        built = [f"{dist_info.name}/{f}" for f in BUILD_ONLY if (dist_info / f).exists()]
        _drop(dist_info, [*STRAY.get(name, ()), *built])
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache)


def _pip_target(pip: Sequence[str | Path], target: Path, *args: str | Path) -> None:
    _run([*pip, "install", *PIP_QUIET, "--no-compile", "--no-deps", "--target", target, *args])


def build(dest: Path, pythons: Sequence[Python], work: Path) -> None:
    arch = _dpkg_arch()
    machine = MACHINES.get(arch)
    if machine is None:
        raise BuildError(f"no manylinux wheels for {arch}: only for {', '.join(MACHINES)}")
    wheels_lock, sources_lock = split_lock(LOCK.read_text(), ("systemd-python",))
    (work / "wheels.lock").write_text(wheels_lock)
    (work / "sources.lock").write_text(sources_lock)
    _run([sys.executable, "-m", "venv", work / "tool"])
    tool = [work / "tool/bin/python", "-m", "pip"]
    _run([*tool, "wheel", *PIP_QUIET, "--no-deps", "--wheel-dir", work / "gpud", ROOT])

    platforms = [a for tag in platform_tags(machine) for a in ("--platform", tag)]
    stages = {}
    for python in pythons:
        stage = stages[python.abi] = work / "stage" / python.abi
        _pip_target(
            tool, stage, "--require-hashes", "--only-binary=:all:",
            "--implementation", "cp", "--python-version", python.version, "--abi", python.abi,
            *platforms, "-r", work / "wheels.lock",
        )  # fmt: skip
        if sources_lock:
            built = work / "sdists" / python.abi
            _run(
                [python.path, "-m", "pip", "wheel", *PIP_QUIET, "--no-deps", "--require-hashes",
                 "--no-binary=:all:", "--use-pep517", "--wheel-dir", built,
                 "-r", work / "sources.lock"],
                env=_compile_env(python),
            )  # fmt: skip
            _pip_target([python.path, "-m", "pip"], stage, *sorted(built.glob("*.whl")))
        _tidy(stage)

    shutil.rmtree(dest, ignore_errors=True)
    common = dest / "common"
    _pip_target(tool, common, *sorted((work / "gpud").glob("gpud-*.whl")))
    _tidy(common)
    shared = common_distributions({abi: _records(stage) for abi, stage in stages.items()})
    for abi, stage in stages.items():
        owners = {dist: _top_levels(stage / dist) for dist in _records(stage)}
        for top in sorted(common_top_levels(owners, shared)):
            if abi == pythons[0].abi:
                shutil.move(str(stage / top), str(common / top))
            else:
                _remove(stage / top)
        shutil.move(str(stage), str(dest / abi))
    _normalize(dest)


def _compile_env(python: Python) -> dict[str, str]:
    """What the sdists are compiled with: no RPATH into the build machine's interpreter (pyenv
    builds link with one), so the extension modules resolve their libraries as the system does,
    and its headers' paths (in assertion messages) written as the system's own /usr."""
    prefix = python.path.parent.parent
    cflags = f"{os.environ.get('CFLAGS', '')} -ffile-prefix-map={prefix}=/usr".strip()
    return {**os.environ, "LDSHARED": f"{os.environ.get('CC', 'gcc')} -shared", "CFLAGS": cflags}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _normalize(dest: Path) -> None:
    """Modes as Debian ships them: directories 0755, files 0644 (extension modules included:
    they are loaded, never executed), whatever the wheels said."""
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _dpkg_arch() -> str:
    out = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


# --- the command ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("depends")
    find, build_ = sub.add_parser("find"), sub.add_parser("build")
    build_.add_argument("--dest", type=Path, required=True)
    for cmd in (find, build_):
        cmd.add_argument(
            "--python", action="append", default=[], metavar="X.Y=PATH",
            help="the CPython X.Y to build with (default: GPUD_PYTHONS, PATH, pyenv)",
        )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "depends":
        print(depends())
        return 0
    try:
        specs = os.environ.get("GPUD_PYTHONS", "").split() + args.python
        pythons = find_pythons(parse_given(specs))
        if args.command == "find":
            print(" ".join(f"{p.version}={p.path}" for p in pythons))
            return 0
        with tempfile.TemporaryDirectory(prefix="gpud-payload-") as work:
            build(args.dest.resolve(), pythons, Path(work))
    except BuildError as exc:
        print(f"deb_payload: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
