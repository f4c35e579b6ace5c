"""The Debian package as users meet it: built, checked, then installed into a clean Debian 12.

The .deb is built from this checkout by scripts/build-deb (dpkg-buildpackage), its contents and
metadata are read back with dpkg-deb, and lintian must report no error or warning. Then a root
made by debootstrap is booted with systemd as PID 1 (systemd-nspawn) and the package goes
through what a node's life does to it: install, gpud.service active through sd_notify, gpudctl
as root and as a gpud group member, devices registered with a kubelet, a MIG layout, an upgrade,
remove, purge, and a node that already runs another project's gpud.

These need root, debootstrap, systemd-nspawn and debhelper; scripts/setup installs them. CI
always has them, so there a missing tool fails; elsewhere the tests skip, saying what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud import __version__
from tests.conftest import unavailable
from tests.support.chroot import Chroot
from tests.support.debroot import ensure_root
from tests.support.nspawn import BootFailed, Container

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache/debroot"
VENV_PY = "/usr/lib/gpud/venv/bin/python3"
SIM_CONFIG = "version: v1\nbackend: sim\nsimulate: dgx-a100\n"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
UPGRADE = f"gpud_{__version__}+upgrade1_{{arch}}.deb"
# Paths a package run may leave that are not gpud's: logs, apt's and dpkg's own records.
NOT_OURS = re.compile(
    r"^/(proc|sys|dev|run|tmp|var/log|var/cache|var/lib/apt|var/lib/dpkg|var/lib/systemd"
    r"|var/tmp|mnt)(/|$)"
)

pytestmark = pytest.mark.package


def _require(tools: list[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    why = ""
    if missing:
        why = f"missing {', '.join(missing)} (scripts/setup installs them)"
    elif os.geteuid() != 0:
        why = "needs root (debootstrap and systemd-nspawn)"
    if why:
        unavailable(why)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require(["dpkg-buildpackage", "dh", "dpkg-deb"])
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [str(ROOT / "scripts/build-deb"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name == f"gpud_{__version__}_{_arch()}.deb"
    return path


def _arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def _upgrade_of(deb: Path, out: Path) -> Path:
    """The same package with a higher version: what an upgrade replaces it with."""
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    version = f"{__version__}+upgrade1"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    new = out / UPGRADE.format(arch=_arch())
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(new)],
        check=True,
        capture_output=True,
    )
    return new


# --- the sources of the package ------------------------------------------------------------------


def _pins(text: str) -> dict[str, str]:
    pins = re.findall(r"(?m)^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_lock_ships_exactly_what_the_tests_run_against() -> None:
    """requirements/runtime.txt is what CI tests; the lock is what the .deb ships. They agree,
    and every distribution in the lock is hash-pinned (pip --require-hashes in debian/rules)."""
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


def test_deb_metadata_and_contents(deb: Path) -> None:
    assert _deb_field(deb, "Package") == "gpud"
    assert _deb_field(deb, "Version") == __version__
    depends = [d.strip() for d in _deb_field(deb, "Depends").split(",")]
    # The system python3 the private venv was built against, that minor version only.
    system = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    major, minor = system.split(".")
    assert f"python3 (>= {system}~)" in depends
    assert f"python3 (<< {major}.{int(minor) + 1})" in depends
    # Not the distribution's Python libraries: they are older than gpud needs.
    assert not [d for d in depends if d.startswith("python3-")], depends

    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[5].removeprefix(".").rstrip("/") for line in listing.splitlines()}
    site = f"/usr/lib/gpud/venv/lib/python{system}/site-packages"
    for expected in (
        "/usr/bin/gpud",
        "/usr/bin/gpudctl",
        "/etc/gpud/gpud.yaml",
        "/usr/share/man/man8/gpud.8.gz",
        "/usr/share/man/man8/gpudctl.8.gz",
        "/usr/share/bash-completion/completions/gpud",
        "/usr/share/bash-completion/completions/gpudctl",
        "/usr/share/doc/gpud/copyright",
        "/usr/share/doc/gpud/examples/cloud-init/gpud-node.yaml",
        "/usr/share/gpud/mig-layouts.yaml",
        "/usr/lib/gpud/venv/pyvenv.cfg",
        f"{site}/gpud/mig/layouts.yaml",
        f"{site}/gpud/mig/catalog.json",
        f"{site}/grpc/__init__.py",
        f"{site}/pydantic/__init__.py",
        f"{site}/systemd/journal.py",
    ):
        assert expected in paths, expected
    units = {p for p in paths if p.endswith(".service")}
    assert {Path(u).name for u in units} == {"gpud.service", "gpud-bootstrap-resume.service"}
    # Bytecode is compiled by postinst and removed by prerm, never owned by dpkg.
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    # Nothing of the build machine: no console scripts or activate scripts with its paths.
    assert sorted(p for p in paths if p.startswith("/usr/lib/gpud/venv/bin/")) == [
        "/usr/lib/gpud/venv/bin/python",
        "/usr/lib/gpud/venv/bin/python3",
        f"/usr/lib/gpud/venv/bin/python{system}",
    ]

    control = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert control == ["/etc/gpud/gpud.yaml"]


def test_lintian_reports_no_errors_or_warnings(deb: Path) -> None:
    _require(["lintian"])
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr


# --- installed into a clean Debian 12 with systemd as PID 1 ---------------------------------------


@pytest.fixture(scope="module")
def node(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    _require(["debootstrap", "systemd-nspawn", "nsenter"])
    root = ensure_root(CACHE)
    work = tmp_path_factory.mktemp("node")
    dist = work / "dist"
    dist.mkdir()
    shutil.copy(deb, dist)
    shutil.move(_upgrade_of(deb, work), dist)
    container = Container(root, {dist: "/mnt/dist", ROOT: "/src"}, work / "nspawn.log")
    try:
        container.boot()
    except BootFailed as exc:
        # The documented fallback: test_install_into_an_image_without_systemd_running still
        # installs the package and runs gpud in a chroot. CI machines boot systemd, so there
        # this is a failure.
        unavailable(f"systemd cannot boot in a container here ({exc}); only the chroot test ran")
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


def test_install_run_upgrade_remove_purge(node: Container, deb: Path) -> None:
    node.run(["useradd", "--create-home", "alice"])
    node.run(["useradd", "--create-home", "bob"])
    before = _files(node)

    # 1. install: the unit is enabled and started, and active only once gpud sent READY=1.
    _apt(node, "install", f"/mnt/dist/{deb.name}")
    assert node.run(["systemctl", "is-enabled", "gpud"]).stdout.strip() == "enabled"
    props = _show(node, "gpud", "ActiveState", "Type", "NotifyAccess", "StatusText", "ExecMainPID")
    assert props["ActiveState"] == "active" and props["Type"] == "notify", props
    # No driver in this root: gpud says so (through sd_notify's STATUS) and keeps running.
    assert props["StatusText"], props
    assert node.run(["getent", "group", "gpud"]).stdout.startswith("gpud:")
    # The bundled layouts link resolves into the installed venv.
    assert "all-1g.5gb:" in node.run(["cat", "/usr/share/gpud/mig-layouts.yaml"]).stdout
    # The units pass systemd's own checks as installed (man pages are checked by lintian).
    verify = node.run(
        ["systemd-analyze", "verify", "--man=no", "gpud.service", "gpud-bootstrap-resume.service"],
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr

    # 2. the simulated GPU node; `systemctl reload` validates and reloads, a restart reconfigures.
    node.write("/etc/gpud/gpud.yaml", SIM_CONFIG)
    node.run(["systemctl", "restart", "gpud"])
    assert _show(node, "gpud", "ActiveState")["ActiveState"] == "active"
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
    }
    status = json.loads(node.run(["gpudctl", "status", "-o", "json"]).stdout)
    assert len(status["gpus"]) == 8, status
    # A member of the gpud group may read; anyone else is told why not.
    node.run(["usermod", "--append", "--groups", "gpud", "alice"])
    as_alice = node.run(["gpudctl", "status", "-o", "json"], user="alice")
    assert json.loads(as_alice.stdout)["gpus"] == status["gpus"]
    as_bob = node.run(["gpudctl", "status"], user="bob", check=False)
    assert as_bob.returncode == 1 and "gpud" in as_bob.stderr, as_bob

    # 3. kubelet appears after gpud started (the usual order on a new node): the sandboxed
    # daemon creates its sockets there and registers, with no restart.
    probe = node.run(
        ["env", "PYTHONPATH=/src", VENV_PY, "-m", "tests.support.kubelet_probe",
         KUBELET_DIR, "nvidia.com/gpu"],
    )  # fmt: skip
    assert json.loads(probe.stdout) == {"nvidia.com/gpu": 8}
    # Logged to journald with fields (systemd-python, built from source into the venv).
    journal = node.run(["journalctl", "-u", "gpud", "RESOURCE=nvidia.com/gpu", "-o", "cat"])
    assert "registered with kubelet" in journal.stdout, journal.stdout

    # 4. a MIG layout, selected and applied
    applied = json.loads(
        node.run(["gpudctl", "mig", "apply", "-c", "all-1g.5gb", "-o", "json"]).stdout
    )
    assert applied["result"] == "applied", applied
    mig_before = json.loads(node.run(["gpudctl", "mig", "show", "-o", "json"]).stdout)

    # 5. upgrade: restarted on the new version, config and MIG layout kept
    pid = _show(node, "gpud", "ExecMainPID")["ExecMainPID"]
    _apt(node, "install", f"/mnt/dist/{UPGRADE.format(arch=_arch())}")
    after = _show(node, "gpud", "ActiveState", "ExecMainPID")
    assert after["ActiveState"] == "active" and after["ExecMainPID"] != pid, after
    assert node.run(["cat", "/etc/gpud/gpud.yaml"]).stdout == SIM_CONFIG
    assert json.loads(node.run(["gpudctl", "mig", "show", "-o", "json"]).stdout) == mig_before
    again = json.loads(
        node.run(["gpudctl", "mig", "apply", "-c", "all-1g.5gb", "-o", "json"]).stdout
    )
    assert again["result"] == "unchanged" and again["mutations"] == 0, again

    # 6. remove: stopped and gone, configuration and state kept
    _apt(node, "remove", "gpud")
    assert node.run(["systemctl", "is-active", "gpud"], check=False).stdout.strip() != "active"
    for gone in ("/usr/bin/gpud", "/usr/bin/gpudctl", "/usr/lib/gpud", "/run/gpud"):
        assert not node.exists(gone), gone
    assert node.run(["cat", "/etc/gpud/gpud.yaml"]).stdout == SIM_CONFIG
    assert node.exists("/var/lib/gpud/mig")
    assert node.run(["getent", "group", "gpud"], check=False).returncode == 0

    # 7. purge: nothing of gpud left
    _apt(node, "purge", "gpud")
    assert node.run(["getent", "group", "gpud"], check=False).returncode != 0
    node.run(["rm", "-rf", "/var/lib/kubelet"])  # the probe's kubelet, not the package's
    left = _files(node) - before
    assert left == set(), sorted(left)


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


# --- installed into an image being built: a chroot, no systemd running ---------------------------


def test_install_into_an_image_without_systemd_running(
    deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Images are built in chroots (and some machines cannot boot systemd in a container): the
    package must install there, enable the unit for the image's first boot without starting
    it, and gpud must run when started by hand, reporting READY through sd_notify. The config
    is written before the install, as cloud-init's write_files does: dpkg must keep it."""
    _require(["debootstrap", "chroot", "mount"])
    root = ensure_root(CACHE)
    work = tmp_path_factory.mktemp("chroot")
    with Chroot(root, {deb.parent: "/mnt/dist"}, work) as image:
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
        notify.settimeout(30)
        daemon = subprocess.Popen(
            image.command(["env", "NOTIFY_SOCKET=/run/notify.sock", "gpud", "run"]),
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
            _, err = daemon.communicate(timeout=30)
            notify.close()
        assert daemon.returncode == 0, err.decode()[-2000:]

        image.run(["apt-get", "--yes", "--quiet", "purge", "gpud"])
        left = _files(image) - before
        assert left == set(), sorted(left)
