"""Asking the installed containerd what it loads: ``containerd --version`` and
``containerd --config FILE config dump``.

gpud's model of imports and merging (:mod:`gpud.host.containerd_imports`) says which file decides
a setting; the binary that will run says what the setting *is*, for its own release, with every
import merged and every default filled in. So wherever the binary can run, its dump is the
ground truth that configure and status check against, before and after an edit. The dump also
holds registry credentials: it is parsed in memory and never printed or stored.

The binary is the platform's: MicroK8s runs its own (``/snap/microk8s/current/bin/containerd``);
k3s builds containerd into its own binary, which has no ``config dump``; elsewhere the first of
the usual install paths. It runs with the root as working directory, because containerd 1.x
resolves relative import globs against its working directory and the service's is ``/``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gpud.host.containerd import read_toml
from gpud.host.containerd_imports import Merged, Release, View, parse_release

MICROK8S_BINARY = "/snap/microk8s/current/bin/containerd"
BINARIES = (
    "/usr/bin/containerd",
    "/usr/local/bin/containerd",
    "/usr/sbin/containerd",
    "/usr/local/sbin/containerd",
)
TIMEOUT = 30.0


class DumpError(RuntimeError):
    """containerd could not load the config (its own message), or could not be run."""


@dataclass(frozen=True)
class Installed:
    """The containerd binary that will load the config."""

    binary: str
    """Its path on the node."""
    path: Path
    """Where it lies here (under the root)."""
    release: Release | None
    error: str | None = None
    """Why ``--version`` gave no release (it would not run here, say)."""

    @property
    def label(self) -> str:
        return f"containerd {self.release}" if self.release else f"{self.binary} (release unknown)"


def find_binary(root: Path, flavour: str) -> str | None:
    """The containerd that runs on this node, as the node names it; None when there is none
    gpud can ask (k3s, or not installed yet)."""
    if flavour == "k3s":
        return None
    candidates = (MICROK8S_BINARY,) if flavour == "microk8s" else BINARIES
    for candidate in candidates:
        located = root / candidate.lstrip("/")
        if located.is_file() and os.access(located, os.X_OK):
            return candidate
    return None


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DumpError(f"'{' '.join(argv)}' gave no answer within {timeout:g}s") from None
    except OSError as exc:
        raise DumpError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def installed(root: Path, flavour: str, timeout: float = TIMEOUT) -> Installed | None:
    """The platform's containerd and its release; None when there is no binary to ask."""
    binary = find_binary(root, flavour)
    if binary is None:
        return None
    path = root / binary.lstrip("/")
    try:
        done = _run([str(path), "--version"], root, timeout)
    except DumpError as exc:
        return Installed(binary, path, None, str(exc))
    release = parse_release(done.stdout) if done.returncode == 0 else None
    if release is None:
        why = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        return Installed(binary, path, None, f"'{binary} --version': {why}")
    return Installed(binary, path, release)


@dataclass(frozen=True)
class Dump:
    """The settings gpud judges, as containerd's dump shows them."""

    runtime: Mapping[str, Any] | None
    binary: Any
    default: Any
    cdi: bool | None
    """None: this release has no ``enable_cdi`` (1.6)."""
    loaded: tuple[str, ...] | None
    """containerd 1.x lists the files it loaded (as it named them); 2.x does not."""


def dump(containerd: Installed, config: Path, root: Path, runtime_name: str) -> Dump:
    """Run ``config dump`` on ``config`` (a path here) and read the settings gpud judges."""
    done = _run([str(containerd.path), "--config", str(config), "config", "dump"], root, TIMEOUT)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit {done.returncode}"
        raise DumpError(f"{containerd.label} cannot load {config}: {why}")
    try:
        data = read_toml(done.stdout)
    except ValueError as exc:
        raise DumpError(f"{containerd.label} printed a dump gpud cannot read: {exc}") from None
    return facts(data, containerd.release, runtime_name)


def facts(data: Mapping[str, Any], release: Release | None, runtime_name: str) -> Dump:
    """The judged settings from a dump's data (pure)."""
    modern = release is not None and release.major >= 2
    plugin = "io.containerd.cri.v1.runtime" if modern else "io.containerd.grpc.v1.cri"
    plugins = data.get("plugins")
    cri = plugins.get(plugin) if isinstance(plugins, Mapping) else None
    cri = cri if isinstance(cri, Mapping) else {}
    ctd = cri.get("containerd")
    ctd = ctd if isinstance(ctd, Mapping) else {}
    runtimes = ctd.get("runtimes")
    runtime = runtimes.get(runtime_name) if isinstance(runtimes, Mapping) else None
    runtime = runtime if isinstance(runtime, Mapping) else None
    options = runtime.get("options") if runtime is not None else None
    binary = options.get("BinaryName") if isinstance(options, Mapping) else None
    cdi = cri.get("enable_cdi")
    imports = data.get("imports")
    loaded = (
        tuple(i for i in imports if isinstance(i, str))
        if not modern and isinstance(imports, list)
        else None
    )
    return Dump(
        runtime,
        binary,
        ctd.get("default_runtime_name"),
        cdi if isinstance(cdi, bool) else None,
        loaded,
    )


def disagreements(
    merged: Merged, dumped: Dump, view: View, config: Path, runtime_name: str
) -> list[str]:
    """Where gpud's reading of the files differs from what containerd loaded (pure but for
    resolving the loaded paths)."""
    out = []
    if dumped.loaded is not None:
        here = {Path(os.path.realpath(view.locate(name))) for name in merged.files}
        theirs = set()
        for name in dumped.loaded:
            located = config if name == str(config) else _located(name, view)
            theirs.add(Path(os.path.realpath(located)))
        if here != theirs:
            out.append(
                f"containerd loaded {sorted(map(str, theirs))}, gpud expected "
                f"{sorted(map(str, here))}"
            )
    if (merged.runtime.value is not None) != (dumped.runtime is not None):
        has = "has" if dumped.runtime is not None else "has no"
        out.append(f"containerd {has} runtime {runtime_name!r}; gpud read the opposite")
    elif dumped.runtime is not None and merged.binary.value != dumped.binary:
        theirs, ours = dumped.binary, merged.binary.value
        out.append(f"containerd's BinaryName is {theirs!r}, gpud read {ours!r}")
    default = dumped.default if dumped.default else "runc"
    if default != merged.default_name:
        out.append(
            f"containerd's default_runtime_name is {default!r}, gpud read {merged.default_name!r}"
        )
    if dumped.cdi is not None and dumped.cdi != merged.cdi.value:
        out.append(f"containerd's enable_cdi is {dumped.cdi}, gpud read {merged.cdi.value}")
    return out


def _located(name: str, view: View) -> Path:
    """A path containerd printed: absolute (already here), or relative to its cwd (the root)."""
    return Path(name) if PurePosixPath(name).is_absolute() else view.root / name
