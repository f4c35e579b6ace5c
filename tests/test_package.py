"""The Debian package as users meet it: built, checked, then installed into clean Debian roots.

One .deb is built from this checkout by scripts/build-deb (dpkg-buildpackage), its contents and
metadata are read back with dpkg-deb, and lintian must report no error or warning. Its payload
(gpud with compiled modules for every CPython from 3.10 to 3.13) runs under each of those
CPythons: Ubuntu 22.04's 3.10 and 24.04's 3.12 as much as the two Debian releases below.

Then the same .deb goes into a Debian 12 root booted with systemd as PID 1 (systemd-nspawn),
through what a node's life does to it: install, gpud.service active through sd_notify, gpudctl
as root and as a gpud group member, devices registered with a kubelet, a MIG layout, an upgrade,
remove, purge, and a node that already runs another project's gpud. In a Debian 13 root (a
newer python3 and systemd) it installs, starts, serves and purges as well.

The .deb and the roots are made once per session before the first test (tests/conftest.py,
tests/support/package_inputs.py), outside the per-test timeout; every step inside a root has
its own bound (tests/support/nspawn.py). These need root, debootstrap, systemd-nspawn and
debhelper; scripts/setup installs them. CI always has them, so there a missing tool fails;
elsewhere the tests skip, saying what is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud import __version__
from scripts.deb_payload import SUPPORTED, abi_tag, locate
from tests.conftest import package_inputs, unavailable
from tests.support.chroot import Chroot
from tests.support.debroot import DEBIAN_12, DEBIAN_13, apt_mirror
from tests.support.kubelet import FakeKubelet
from tests.support.nspawn import BootFailed, Container
from tests.support.process import GpudProcess

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = "/usr/lib/gpud"
SIM_CONFIG = "version: v1\nbackend: sim\nsimulate: dgx-a100\n"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
# Paths a package run may leave that are not gpud's: logs, apt's and dpkg's own records.
NOT_OURS = re.compile(
    r"^/(proc|sys|dev|run|tmp|var/log|var/cache|var/lib/apt|var/lib/dpkg|var/lib/systemd"
    r"|var/tmp|mnt)(/|$)"
)
# The modules each part of the payload holds besides the distributions' *.dist-info: gpud and
# what packaging/requirements.lock pins, nothing else (no sample programs, no scripts). A new
# dependency adds its import names here, once its files were checked.
COMMON_MODULES = {
    "annotated_types",
    "anyio",
    "asyncinotify",
    "exceptiongroup",
    "google",
    "gpud",
    "h11",
    "h2",
    "hpack",
    "httpcore2",
    "httpx2",
    "hyperframe",
    "idna",
    "lightkube",
    "pydantic",
    "prometheus_client",
    "pynvml.py",
    "pyudev",
    "tomlkit",
    "truststore",
    "typing_extensions.py",
    "typing_inspection",
    "wsproto",
}
COMPILED_MODULES = {"_yaml", "grpc", "msgspec", "pydantic_core", "systemd", "yaml"}
CP = [abi_tag(v) for v in SUPPORTED]  # cp310 … cp313
# What the build machine's paths look like: pyenv's interpreters, the payload's build directory.
BUILD_MACHINE = (b"/.pyenv/", b"gpud-payload-", b"/pip-req-build-", b"/pip-install-")
# Imports every extension module under the payload (as the entry points set sys.path) and
# every gpud module, so a CPython the payload has no or broken modules for fails here.
IMPORT_ALL = """\
import importlib, json, os, pkgutil, sys
payload, abi = sys.argv[1], sys.argv[2]
sys.path[:0] = [os.path.join(payload, abi), os.path.join(payload, "common")]
loaded = []
for base in sys.path[:2]:
    for dirpath, _, files in os.walk(base):
        for name in files:
            if name.endswith(".so"):
                rel = os.path.relpath(os.path.join(dirpath, name), base)
                module = rel.split(".", 1)[0].replace(os.sep, ".")
                importlib.import_module(module)
                loaded.append(module)
import gpud
for info in pkgutil.walk_packages(gpud.__path__, "gpud."):
    importlib.import_module(info.name)
    loaded.append(info.name)
# The API link's client, which gpud imports only once the link has credentials (anyio's
# asyncio backend, which httpcore2 runs on, needs exceptiongroup on 3.10).
for name in ("anyio._backends._asyncio", "httpcore2", "httpx2", "lightkube.resources.core_v1"):
    importlib.import_module(name)
    loaded.append(name)
print(json.dumps(loaded))
"""

pytestmark = [
    pytest.mark.package,
    # A backstop only: each step has its own, shorter bound and fails naming itself first.
    pytest.mark.timeout(1800),
]


# --- the session's inputs (made before the first test, see tests/conftest.py) -------------------


@pytest.fixture(scope="session")
def deb(request: pytest.FixtureRequest) -> Path:
    path = package_inputs(request.config, "deb").deb
    assert path is not None and path.name == f"gpud_{__version__}_{_arch()}.deb", path
    return path


@pytest.fixture(scope="session")
def upgrade_deb(request: pytest.FixtureRequest, deb: Path) -> Path:
    path = package_inputs(request.config, "deb").upgrade
    assert path is not None
    return path


@pytest.fixture(scope="session")
def debian12_root(request: pytest.FixtureRequest) -> Path:
    return package_inputs(request.config, "debian12_root").roots[DEBIAN_12]


@pytest.fixture(scope="session")
def debian13_root(request: pytest.FixtureRequest) -> Path:
    return package_inputs(request.config, "debian13_root").roots[DEBIAN_13]


@pytest.fixture(scope="session")
def payload(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb's files unpacked (not installed): the entry points find the payload beside
    them, so they run from here."""
    tree = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(tree)], check=True)
    return tree


def _arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def _boot(root: Path, binds: dict[Path, str], log: Path) -> Container:
    _require(["systemd-nspawn", "nsenter"])
    container = Container(root, binds, log)
    try:
        container.boot()
    except BootFailed as exc:
        # The documented fallback: test_install_into_an_image_without_systemd_running still
        # installs the package and runs gpud in a chroot. CI machines boot systemd, so there
        # this is a failure.
        unavailable(f"systemd cannot boot in a container here ({exc}); only the chroot test ran")
    return container


def _require(tools: list[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (scripts/setup installs them)")


def _python(version: str) -> Path:
    """This machine's CPython ``version`` (PATH or pyenv, as scripts/build-deb finds them)."""
    path, why = locate(version)
    if path is None:
        unavailable(f"no CPython {version} here to run the payload with: {why}")
    return path


# --- the sources of the package ------------------------------------------------------------------


def _pins(text: str) -> dict[str, str]:
    pins = re.findall(r"(?m)^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_lock_ships_exactly_what_the_tests_run_against() -> None:
    """requirements/runtime.txt is what CI tests; the lock is what the .deb ships. They agree,
    and every distribution in the lock is hash-pinned (pip --require-hashes in the build)."""
    runtime = _pins((ROOT / "requirements/runtime.txt").read_text())
    lock_text = (ROOT / "packaging/requirements.lock").read_text()
    lock = _pins(lock_text)
    assert {name: lock.get(name) for name in runtime} == runtime, "run scripts/gen-deb-lock"
    for block in re.split(r"(?m)^(?=[A-Za-z0-9])", lock_text):
        if "==" in block:
            assert "--hash=sha256:" in block, block


def test_one_version_everywhere() -> None:
    changelog = (ROOT / "packaging/debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"gpud ({__version__}) ")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject


# --- the .deb itself -----------------------------------------------------------------------------


def _min_version(depends: list[str], package: str) -> tuple[int, ...]:
    found = [d for d in depends if d.startswith(f"{package} (>= ")]
    assert len(found) == 1, (package, depends)
    return tuple(int(n) for n in re.findall(r"\d+", found[0].split(">=")[1].split("-")[0])[:2])


def test_deb_metadata_and_contents(deb: Path) -> None:
    assert _deb_field(deb, "Package") == "gpud"
    assert _deb_field(deb, "Version") == __version__
    depends = [d.strip() for d in _deb_field(deb, "Depends").split(",")]
    # Every python3 the payload carries modules for: Ubuntu 22.04's 3.10 to Debian 13's 3.13,
    # so a release upgrade that moves python3 within them keeps gpud installed.
    assert "python3 (>= 3.10~)" in depends and "python3 (<< 3.14)" in depends, depends
    # Not the distribution's Python libraries: they are older than gpud needs.
    assert not [d for d in depends if d.startswith("python3-")], depends
    # Installable on the oldest supported release, Ubuntu 22.04: glibc 2.35, systemd 249.
    assert _min_version(depends, "libc6") <= (2, 35), depends
    assert _min_version(depends, "libsystemd0") <= (249,), depends
    # pyudev loads libudev through ctypes, which dh_shlibdeps cannot see: named by hand.
    assert "libudev1" in depends, depends

    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[5].removeprefix(".").rstrip("/") for line in listing.splitlines()}
    for expected in (
        "/usr/bin/gpud",
        "/usr/bin/gpudctl",
        f"{PAYLOAD}/check-conflicts",
        "/etc/gpud/gpud.yaml",
        "/usr/share/man/man8/gpud.8.gz",
        "/usr/share/man/man8/gpudctl.8.gz",
        "/usr/share/bash-completion/completions/gpud",
        "/usr/share/bash-completion/completions/gpudctl",
        "/usr/share/doc/gpud/copyright",
        "/usr/share/doc/gpud/examples/cloud-init/gpud-node.yaml",
        "/usr/share/gpud/mig-layouts.yaml",
        f"{PAYLOAD}/common/gpud/mig/layouts.yaml",
        f"{PAYLOAD}/common/gpud/mig/catalog.json",
        f"{PAYLOAD}/common/pydantic/__init__.py",
        *(f"{PAYLOAD}/{cp}/grpc/__init__.py" for cp in CP),
        *(f"{PAYLOAD}/{cp}/systemd/journal.py" for cp in CP),
    ):
        assert expected in paths, expected
    tops = {p for p in paths if p.startswith(f"{PAYLOAD}/") and p.count("/") == 4}
    assert tops == {f"{PAYLOAD}/{top}" for top in ("check-conflicts", "common", *CP)}, tops
    units = {p for p in paths if p.endswith(".service")}
    assert {Path(u).name for u in units} == {"gpud.service", "gpud-bootstrap-resume.service"}
    # Bytecode is compiled by postinst and removed by prerm, never owned by dpkg.
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]

    def control(name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "--info", str(deb), name], capture_output=True, text=True, check=True
        ).stdout

    assert control("conffiles").split() == ["/etc/gpud/gpud.yaml"]
    # A python3 upgrade (a release upgrade's new minor above all) recompiles the bytecode.
    assert "interest-noawait /usr/bin/python3" in control("triggers").splitlines()


def _modules(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if not p.name.endswith(".dist-info")}


def _distributions(directory: Path) -> set[str]:
    names = (p.name.removesuffix(".dist-info") for p in directory.glob("*.dist-info"))
    return {
        re.sub(r"[-_.]+", "-", n.rsplit("-", 1)[0]).lower() + "==" + n.rsplit("-", 1)[1]
        for n in names
    }


def test_payload_holds_the_lock_for_every_cpython_and_nothing_else(
    payload: Path, deb: Path
) -> None:
    lib = payload / PAYLOAD.lstrip("/")
    lock = {
        f"{name}=={version}"
        for name, version in _pins((ROOT / "packaging/requirements.lock").read_text()).items()
    }
    common = lib / "common"
    assert _modules(common) == COMMON_MODULES
    for version in SUPPORTED:
        compiled = lib / abi_tag(version)
        assert _modules(compiled) == COMPILED_MODULES, version
        # Each distribution once on that CPython's path: in common/ or in its own cp3XY/.
        assert not _distributions(common) & _distributions(compiled)
        assert _distributions(common) | _distributions(compiled) == lock | {f"gpud=={__version__}"}
    # nvidia-ml-py's sample program is gone, and so is its name from the wheel's metadata.
    assert not list(lib.rglob("example.py"))
    (nvml,) = common.glob("nvidia_ml_py-*.dist-info")
    assert "example" not in (nvml / "top_level.txt").read_text().split()
    assert "example.py" not in (nvml / "RECORD").read_text()

    # Nothing of the build machine: its interpreters, its build directories, RPATHs.
    needles = (*BUILD_MACHINE, str(deb.parent).encode())
    for path in (p for p in payload.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        assert not [n for n in needles if n in data], (path, [n for n in needles if n in data])
        if path.suffix == ".so":
            dynamic = subprocess.run(
                ["readelf", "--dynamic", str(path)], capture_output=True, text=True, check=True
            ).stdout
            assert "RPATH" not in dynamic and "RUNPATH" not in dynamic, (path, dynamic)


@pytest.mark.parametrize("version", SUPPORTED)
def test_payload_runs_on_every_supported_cpython(
    version: str, payload: Path, short_tmp: Path
) -> None:
    """Ubuntu 22.04 (3.10) and 24.04 (3.12) as much as Debian 12 (3.11) and 13 (3.13): the
    entry points, run as their #! line runs them, find their modules, every compiled module
    loads, and the daemon serves a simulated node to a kubelet and gpudctl."""
    python = _python(version)
    lib = payload / PAYLOAD.lstrip("/")

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [str(python), "-IS", *map(str, args)],
            capture_output=True, text=True, timeout=120, check=False, cwd=short_tmp,
        )  # fmt: skip
        assert not check or out.returncode == 0, out.stderr
        return out

    assert run(payload / "usr/bin/gpud", "--version").stdout.strip() == f"gpud {__version__}"
    assert "exit status: 0 success" in run(payload / "usr/bin/gpudctl", "--help").stdout
    empty = short_tmp / "empty-root"
    empty.mkdir()
    run(lib / "check-conflicts", "--root", empty)
    loaded = json.loads(run("-c", IMPORT_ALL, lib, abi_tag(version)).stdout)
    assert {"grpc._cython.cygrpc", "pydantic_core._pydantic_core", "yaml._yaml",
            "systemd._journal", "systemd._daemon", "gpud.daemon", "msgspec._core",
            "lightkube.resources.core_v1"} <= set(loaded)  # fmt: skip

    kubelet = FakeKubelet(short_tmp / "kubelet")
    daemon = _PayloadGpud(python, payload, short_tmp)
    kubelet.start()
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        kubelet.wait_devices("nvidia.com/gpu", lambda d: len(d) == 8, timeout=60)
        status = run(payload / "usr/bin/gpudctl", "--socket", daemon.socket, "status", "-o", "json")
        assert len(json.loads(status.stdout)["gpus"]) == 8
    finally:
        code = daemon.terminate()
        kubelet.stop()
    assert code == 0, daemon.log_path.read_text()[-3000:]


class _PayloadGpud(GpudProcess):
    """The unpacked package's ``gpud run`` under a given CPython, isolated from the test venv."""

    def __init__(self, python: Path, payload: Path, tmp: Path) -> None:
        super().__init__(
            "dgx-a100", tmp / "kubelet", tmp / "state", tmp / "gpud.sock", log_dir=tmp / "log"
        )
        self.python = python
        self.payload = payload

    @property
    def argv(self) -> list[str]:
        gpud = self.payload / "usr/bin/gpud"
        return [str(self.python), "-IS", str(gpud), *super().argv[3:]]


def test_payload_refuses_an_unsupported_python_clearly(payload: Path) -> None:
    """A python3 the package has no modules for (forced past Depends) is named, with the ones
    it has, instead of an ImportError."""
    python = _python("3.9")
    out = subprocess.run(
        [str(python), "-IS", str(payload / "usr/bin/gpud"), "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "Python 3.9" in out.stderr and ", ".join(SUPPORTED) in out.stderr, out.stderr


def test_lintian_reports_no_errors_or_warnings(deb: Path) -> None:
    _require(["lintian"])
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr


# --- installed into clean Debian roots with systemd as PID 1 -------------------------------------


@pytest.fixture(scope="module")
def node(
    deb: Path, upgrade_deb: Path, debian12_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("debian12")
    binds = {deb.parent: "/mnt/dist", upgrade_deb.parent: "/mnt/upgrade", ROOT: "/src"}
    container = _boot(debian12_root, binds, work / "nspawn.log")
    try:
        yield container
    finally:
        container.close()


@pytest.fixture(scope="module")
def debian13(
    deb: Path, debian13_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("debian13")
    container = _boot(debian13_root, {deb.parent: "/mnt/dist"}, work / "nspawn.log")
    try:
        yield container
    finally:
        container.close()


def _files(node: Container | Chroot) -> set[str]:
    """Every path of the root that a package could own (logs and apt's records aside)."""
    listing = node.run(["find", "/", "-xdev"]).stdout.splitlines()
    return {p for p in listing if not NOT_OURS.match(p)}


def _show(node: Container, unit: str, *props: str) -> dict[str, str]:
    out = node.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _sandbox_writes(node: Container) -> dict[str, bool]:
    """Which directories the running daemon may write, seen from its own mount namespace.

    Directories that do not exist yet are made on the host first (outside the sandbox), the
    way kubelet makes its directory after gpud is up.
    """
    pid = _show(node, "gpud", "MainPID")["MainPID"]
    probes = [
        "/etc/gpud",
        "/usr/lib/gpud",
        "/home/alice",
        "/var/lib/gpud",
        "/run/gpud",
        # Not device-plugins itself: gpud would serve its sockets there at once, racing the
        # cleanup below. Step 3 shows that one working.
        "/var/lib/kubelet/pods",
        "/var/snap/microk8s/common/var/lib/kubelet/device-plugins",
        NFD_DIR,
    ]
    writable = {}
    for directory in probes:
        node.run(["mkdir", "-p", directory])
        probe = f"{directory}/.gpud-sandbox-probe"
        inside = ["nsenter", "-t", pid, "-m", "sh", "-c", f"touch {probe} && rm {probe}"]
        writable[directory] = node.run(inside, check=False).returncode == 0
    node.run(["rm", "-rf", "/var/snap", "/var/lib/kubelet"])
    return writable


def _apt(node: Container, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return node.run(["apt-get", "--yes", "--quiet", *args], check=check)


def _installed_and_ready(node: Container, deb: str) -> None:
    """apt installs the .deb; the unit is enabled, and active only once gpud sent READY=1."""
    _apt(node, "install", deb)
    assert node.run(["systemctl", "is-enabled", "gpud"]).stdout.strip() == "enabled"
    props = _show(node, "gpud", "ActiveState", "Type", "StatusText", "NRestarts")
    assert props["ActiveState"] == "active" and props["Type"] == "notify", props
    assert props["NRestarts"] == "0", props
    # No driver in this root: gpud says so (through sd_notify's STATUS) and keeps running.
    assert props["StatusText"], props
    # The units pass systemd's own checks as installed (man pages are checked by lintian).
    verify = node.run(
        ["systemd-analyze", "verify", "--man=no", "gpud.service", "gpud-bootstrap-resume.service"],
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


def _documented_exposure(release: str) -> str:
    """The `systemd-analyze security` figure docs/systemd.md gives for ``release``."""
    doc = (ROOT / "docs/systemd.md").read_text()
    found = re.search(rf"\*\*(\d+\.\d+ \(\w+\))\*\* on {release} ", doc)
    assert found, f"docs/systemd.md gives no systemd-analyze security figure for {release}"
    return found.group(1)


def _exposure(node: Container) -> str:
    out = node.run(["systemd-analyze", "security", "--no-pager", "gpud.service"]).stdout
    found = re.search(r"Overall exposure level for gpud\.service: (\d+\.\d+) (\w+)", out)
    assert found, out[-2000:]
    return f"{found.group(1)} ({found.group(2)})"


def _serves_the_simulated_node(node: Container) -> dict[str, object]:
    node.write("/etc/gpud/gpud.yaml", SIM_CONFIG)
    node.run(["systemctl", "restart", "gpud"])
    assert _show(node, "gpud", "ActiveState")["ActiveState"] == "active"
    status = json.loads(node.run(["gpudctl", "status", "-o", "json"]).stdout)
    assert len(status["gpus"]) == 8, status
    # /metrics on dcgm-exporter's port, through the unit's sandbox (RestrictAddressFamilies).
    (metrics,) = [p for p in status["publishers"] if p["name"] == "metrics"]
    where = metrics["detail"].removeprefix("serving /metrics on ").split(", ")
    assert "0.0.0.0:9400" in where, metrics
    scrape = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9400/metrics').read())"
    body = node.run(["python3", "-c", scrape]).stdout
    assert body.count("DCGM_FI_DEV_GPU_UTIL{") == 8, body[-2000:]
    return status


def test_install_run_upgrade_remove_purge(node: Container, deb: Path, upgrade_deb: Path) -> None:
    node.run(["useradd", "--create-home", "alice"])
    node.run(["useradd", "--create-home", "bob"])
    node.run(["mkdir", "-p", NFD_DIR])  # as NFD's worker makes it, before gpud comes
    before = _files(node)

    # 1. install: enabled, started, active through READY=1, on Debian 12's python3 3.11.
    _installed_and_ready(node, f"/mnt/dist/{deb.name}")
    assert node.exists(f"{PAYLOAD}/common/gpud/__pycache__/__init__.cpython-311.pyc")
    assert node.run(["getent", "group", "gpud"]).stdout.startswith("gpud:")
    # The bundled layouts link resolves into the installed payload.
    assert "all-1g.5gb:" in node.run(["cat", "/usr/share/gpud/mig-layouts.yaml"]).stdout
    assert _exposure(node) == _documented_exposure("Debian 12")

    # 2. the simulated GPU node; `systemctl reload` validates and reloads, a restart reconfigures.
    status = _serves_the_simulated_node(node)
    node.run(["systemctl", "reload", "gpud"])
    assert _sandbox_writes(node) == {
        "/etc/gpud": False,
        "/usr/lib/gpud": False,
        "/home/alice": False,
        "/var/lib/gpud": True,
        "/run/gpud": True,
        # Created after gpud started, as kubelet or MicroK8s would: still writable to it.
        "/var/lib/kubelet/pods": True,
        "/var/snap/microk8s/common/var/lib/kubelet/device-plugins": True,
        NFD_DIR: True,
    }
    # The node labels, in NFD's directory (opened in the sandbox because it existed at start).
    labels = _labels_published(node)
    assert labels["nvidia.com/gpu.count"] == "8", labels
    # A member of the gpud group may read; anyone else is told why not.
    node.run(["usermod", "--append", "--groups", "gpud", "alice"])
    as_alice = node.run(["gpudctl", "status", "-o", "json"], user="alice")
    assert json.loads(as_alice.stdout)["gpus"] == status["gpus"]
    as_bob = node.run(["gpudctl", "status"], user="bob", check=False)
    assert as_bob.returncode == 1 and "gpud" in as_bob.stderr, as_bob

    # 3. kubelet appears after gpud started (the usual order on a new node): the sandboxed
    # daemon creates its sockets there and registers, with no restart. The probe runs on the
    # package's own modules, as the entry points set them up.
    probe = node.run(["python3", "-IS", "-c", KUBELET_PROBE, KUBELET_DIR, "nvidia.com/gpu"])
    assert json.loads(probe.stdout) == {"nvidia.com/gpu": 8}
    # Logged to journald with fields (systemd-python, built from source for each CPython).
    journal = node.run(["journalctl", "-u", "gpud", "RESOURCE=nvidia.com/gpu", "-o", "cat"])
    assert "registered with kubelet" in journal.stdout, journal.stdout

    # 4. a MIG layout, selected and applied. kubelet's directory is there (step 3) but no
    # kubelet answers on PodResources: gpud cannot tell which pods use the GPUs, so it refuses
    # to take them away until the operator forces it.
    refused = node.run(["gpudctl", "mig", "apply", "-c", "all-1g.5gb"], check=False)
    assert refused.returncode == 1 and "kubelet is installed" in refused.stderr, refused
    assert "--force" in refused.stderr, refused.stderr
    applied = json.loads(
        node.run(["gpudctl", "mig", "apply", "-c", "all-1g.5gb", "--force", "-o", "json"]).stdout
    )
    assert applied["result"] == "applied", applied
    mig_before = _mig_layout(node)

    # 5. upgrade: restarted on the new version, config and MIG layout kept
    pid = _show(node, "gpud", "ExecMainPID")["ExecMainPID"]
    _apt(node, "install", f"/mnt/upgrade/{upgrade_deb.name}")
    after = _show(node, "gpud", "ActiveState", "ExecMainPID")
    assert after["ActiveState"] == "active" and after["ExecMainPID"] != pid, after
    assert node.run(["cat", "/etc/gpud/gpud.yaml"]).stdout == SIM_CONFIG
    assert _mig_layout(node) == mig_before
    again = json.loads(
        node.run(["gpudctl", "mig", "apply", "-c", "all-1g.5gb", "-o", "json"]).stdout
    )
    assert again["result"] == "unchanged" and again["mutations"] == 0, again

    # 6. remove: stopped and gone, configuration and state kept
    _apt(node, "remove", "gpud")
    assert node.run(["systemctl", "is-active", "gpud"], check=False).stdout.strip() != "active"
    for gone in ("/usr/bin/gpud", "/usr/bin/gpudctl", PAYLOAD, "/run/gpud"):
        assert not node.exists(gone), gone
    assert node.run(["cat", "/etc/gpud/gpud.yaml"]).stdout == SIM_CONFIG
    assert node.exists("/var/lib/gpud/mig")
    assert node.run(["getent", "group", "gpud"], check=False).returncode == 0
    assert node.exists(f"{NFD_DIR}/gpud")  # the labels stay while gpud is away

    # 7. purge: nothing of gpud left
    _apt(node, "purge", "gpud")
    assert node.run(["getent", "group", "gpud"], check=False).returncode != 0
    node.run(["rm", "-rf", "/var/lib/kubelet"])  # the probe's kubelet, not the package's
    left = _files(node) - before
    assert left == set(), sorted(left)


NFD_DIR = "/etc/kubernetes/node-feature-discovery/features.d"


def _labels_published(node: Container) -> dict[str, str]:
    """``gpudctl labels -o json`` once the file is there; it must name the file."""
    wait = f"for i in $(seq 100); do [ -f {NFD_DIR}/gpud ] && exit 0; sleep 0.1; done; exit 1"
    node.run(["sh", "-c", wait])
    answer = json.loads(node.run(["gpudctl", "labels", "-o", "json"]).stdout)
    assert answer["nfd_file"] == f"{NFD_DIR}/gpud", answer
    return answer["labels"]


def _mig_layout(node: Container) -> dict[str, object]:
    """`gpudctl mig show` without the daemon's own lock statistics, which start anew with it."""
    shown = json.loads(node.run(["gpudctl", "mig", "show", "-o", "json"]).stdout)
    return {k: v for k, v in shown.items() if not k.startswith("lock_longest_held")}


# tests.support.kubelet_probe on the installed payload's modules, with the checkout's tests.
KUBELET_PROBE = f"""\
import runpy, sys
abi = "cp%d%d" % sys.version_info[:2]
sys.path[:0] = ["/src", "{PAYLOAD}/" + abi, "{PAYLOAD}/common"]
sys.argv[0] = "kubelet_probe"
runpy.run_module("tests.support.kubelet_probe", run_name="__main__")
"""


def test_refuses_to_start_beside_leptons_gpud(node: Container, deb: Path) -> None:
    node.write(
        "/etc/systemd/system/gpud.service",
        "[Unit]\nDescription=GPUd\n[Service]\nExecStart=/usr/local/bin/gpud run\n"
        "[Install]\nWantedBy=multi-user.target\n",
    )
    node.write("/usr/local/bin/gpud", "#!/bin/sh\nexec sleep infinity\n")
    node.write("/var/lib/gpud/gpud.state", "Lepton's, in the directory we share")
    node.run(["chmod", "+x", "/usr/local/bin/gpud"])
    node.run(["systemctl", "daemon-reload"])

    refused = _apt(node, "install", f"/mnt/dist/{deb.name}", check=False)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "/etc/systemd/system/gpud.service" in said and "/usr/local/bin/gpud" in said, said
    assert "dpkg --configure -a" in said, said
    status = node.run(["dpkg-query", "-W", "-f=${Status}", "gpud"]).stdout
    assert status == "install ok half-configured", status
    assert node.run(["systemctl", "is-active", "gpud"], check=False).stdout.strip() != "active"

    # The operator follows the steps; configuring then finishes and our gpud runs.
    node.run(["rm", "/etc/systemd/system/gpud.service", "/usr/local/bin/gpud"])
    node.run(["systemctl", "daemon-reload"])
    node.run(["dpkg", "--configure", "-a"])
    props = _show(node, "gpud", "ActiveState", "FragmentPath")
    assert props["ActiveState"] == "active", props
    assert props["FragmentPath"] in ("/lib/systemd/system/gpud.service",
                                     "/usr/lib/systemd/system/gpud.service")  # fmt: skip
    # Purge leaves the other gpud's state alone, and says so.
    purged = _apt(node, "purge", "gpud")
    assert "gpud.state" in purged.stdout + purged.stderr
    assert node.exists("/var/lib/gpud/gpud.state")


def test_the_same_deb_on_debian_13(debian13: Container, deb: Path) -> None:
    """The package built on Debian 12 installs, starts, serves and purges on Debian 13: another
    python3 (3.13, its own compiled modules) and another systemd (257)."""
    python3 = debian13.run(["python3", "-c", "import sys; print(sys.version_info[:2])"]).stdout
    assert python3.strip() == "(3, 13)", python3
    before = _files(debian13)

    _installed_and_ready(debian13, f"/mnt/dist/{deb.name}")
    assert debian13.exists(f"{PAYLOAD}/cp313/grpc/__pycache__/__init__.cpython-313.pyc")
    assert _exposure(debian13) == _documented_exposure("Debian 13")
    _serves_the_simulated_node(debian13)
    _picks_up_a_driver_that_loads_later(debian13)
    applied = json.loads(
        debian13.run(["gpudctl", "mig", "apply", "-c", "all-1g.5gb", "-o", "json"]).stdout
    )
    assert applied["result"] == "applied", applied
    # Logged to journald with fields (systemd-python built for 3.13): the MIG steps.
    journal = debian13.run(["journalctl", "-u", "gpud", "-o", "json"]).stdout.splitlines()
    assert any("STEP" in json.loads(entry) for entry in journal), journal[-20:]

    _apt(debian13, "purge", "gpud")
    assert debian13.run(["getent", "group", "gpud"], check=False).returncode != 0
    left = _files(debian13) - before
    assert left == set(), sorted(left)


def _picks_up_a_driver_that_loads_later(node: Container) -> None:
    """The installed, sandboxed daemon started before the (simulated) driver: it waits, then
    opens the GPUs with no restart, after asking systemd to resolve its DeviceAllow groups again
    (a runtime drop-in of the same entries), as it does for a real driver."""
    node.run(["mkdir", "-p", "/var/lib/gpud/sim/dev"])
    node.write("/var/lib/gpud/sim/driver", "not-loaded")
    node.run(["systemctl", "restart", "gpud"])
    waiting = node.run(["gpudctl", "status", "-o", "json"], check=False)
    status = json.loads(waiting.stdout)
    assert status["backend_error"].startswith("no driver"), status
    pid = _show(node, "gpud", "MainPID")["MainPID"]

    node.write("/var/lib/gpud/sim/driver", "loaded")
    node.run(["touch", "/var/lib/gpud/sim/dev/nvidiactl"])  # what udev does for the module
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(node.run(["gpudctl", "status", "-o", "json"]).stdout)
        if len(status["gpus"]) == 8:
            break
        time.sleep(0.2)
    assert len(status["gpus"]) == 8 and not status["backend_error"], status
    assert _show(node, "gpud", "MainPID")["MainPID"] == pid
    drop_in = node.run(["systemctl", "cat", "gpud"]).stdout
    assert "/run/systemd/system.control/gpud.service.d/" in drop_in, drop_in
    assert "DeviceAllow=char-nvidia* rwm" in drop_in.split("system.control", 1)[1], drop_in
    journal = node.run(["journalctl", "-u", "gpud", "-o", "cat"]).stdout
    assert "device policy refreshed" in journal, journal[-3000:]
    node.run(["rm", "-rf", "/var/lib/gpud/sim/driver", "/var/lib/gpud/sim/dev"])


def test_python3_moves_to_the_next_release_underneath_gpud(
    deb: Path, debian12_root: Path, tmp_path: Path
) -> None:
    """What a release upgrade does to python3 (here Debian 12's 3.11 to Debian 13's 3.13, as
    22.04's 3.10 to 24.04's 3.12): gpud stays installed, its trigger compiles the bytecode for
    the new python3, and after a restart the daemon runs on it from its own cp313/."""
    node = _boot(debian12_root, {deb.parent: "/mnt/dist"}, tmp_path / "nspawn.log")
    try:
        _installed_and_ready(node, f"/mnt/dist/{deb.name}")
        _serves_the_simulated_node(node)
        node.write("/etc/apt/sources.list.d/trixie.list", f"deb {apt_mirror()} {DEBIAN_13} main\n")
        _apt(node, "update")
        upgraded = _apt(node, "install", "python3")
        assert "Processing triggers for gpud" in upgraded.stdout, upgraded.stdout[-3000:]
        assert node.run(["python3", "--version"]).stdout.split()[1].startswith("3.13.")
        status = node.run(["dpkg-query", "-W", "-f=${Status}", "gpud"]).stdout
        assert status == "install ok installed", status
        compiled = node.run(["find", PAYLOAD, "-name", "*.pyc"]).stdout.split()
        assert f"{PAYLOAD}/cp313/grpc/__pycache__/__init__.cpython-313.pyc" in compiled
        assert f"{PAYLOAD}/common/gpud/__pycache__/__init__.cpython-313.pyc" in compiled
        assert not [p for p in compiled if ".cpython-311." in p]

        node.run(["systemctl", "restart", "gpud"])
        props = _show(node, "gpud", "ActiveState", "MainPID")
        assert props["ActiveState"] == "active", props
        exe = node.run(["readlink", f"/proc/{props['MainPID']}/exe"]).stdout.strip()
        assert exe == "/usr/bin/python3.13", exe
        status = json.loads(node.run(["gpudctl", "status", "-o", "json"]).stdout)
        assert len(status["gpus"]) == 8, status
    finally:
        node.close()


# --- installed into an image being built: a chroot, no systemd running ---------------------------


def test_install_into_an_image_without_systemd_running(
    deb: Path, debian12_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Images are built in chroots (and some machines cannot boot systemd in a container): the
    package must install there, enable the unit for the image's first boot without starting
    it, and gpud must run when started by hand, reporting READY through sd_notify. The config
    is written before the install, as cloud-init's write_files does: dpkg must keep it."""
    _require(["chroot", "mount"])
    work = tmp_path_factory.mktemp("chroot")
    with Chroot(debian12_root, {deb.parent: "/mnt/dist"}, work) as image:
        before = _files(image)
        image.run(
            ["sh", "-ec", f"mkdir /etc/gpud; printf '%s' '{SIM_CONFIG}' > /etc/gpud/gpud.yaml"]
        )
        # What cloud-init's package install passes, so dpkg does not stop at a conffile prompt.
        confold = "Dpkg::Options::=--force-confold"
        image.run(
            ["apt-get", "--yes", "--quiet", "-o", confold, "install", f"/mnt/dist/{deb.name}"]
        )
        assert image.run(["cat", "/etc/gpud/gpud.yaml"]).stdout == SIM_CONFIG
        assert (
            image.run(["test", "-f", "/etc/gpud/gpud.yaml.dpkg-dist"], check=False).returncode == 0
        )
        wants = "/etc/systemd/system/multi-user.target.wants/gpud.service"
        assert image.run(["test", "-L", wants], check=False).returncode == 0

        notify_path = image.path / "run/notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(120)
        daemon = subprocess.Popen(
            # The image shares the host's network: a free port, not the host's :9400.
            image.command(
                [
                    "env",
                    "NOTIFY_SOCKET=/run/notify.sock",
                    "gpud",
                    "run",
                    "--metrics-listen",
                    "127.0.0.1:0",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            messages = []
            while not any("READY=1" in m for m in messages):
                messages.append(notify.recv(4096).decode())
            status = json.loads(image.run(["gpudctl", "status", "-o", "json"]).stdout)
            assert len(status["gpus"]) == 8
        finally:
            daemon.terminate()
            _, err = daemon.communicate(timeout=60)
            notify.close()
        assert daemon.returncode == 0, err.decode()[-2000:]

        image.run(["apt-get", "--yes", "--quiet", "purge", "gpud"])
        left = _files(image) - before
        assert left == set(), sorted(left)
