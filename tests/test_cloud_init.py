"""The cloud-init user data in packaging/cloud-init: valid for cloud-init and for gpud alike.

An operator pastes these files into a cloud console and finds out what is wrong only when a node
does not come up, so each is checked by cloud-init's own schema (22.4 or later), its embedded
``/etc/gpud/gpud.yaml`` by gpud's config loader, and the order the node depends on (config
written before gpud is installed, ``gpud bootstrap`` last, no reboot of cloud-init's own).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gpud.config.load import parse
from gpud.mig import layout
from tests.conftest import unavailable
from tests.support.locks import HOLDER_NAME, LockHolder, real_apt_get

CLOUD_INIT_DIR = Path(__file__).resolve().parent.parent / "packaging" / "cloud-init"
APT, DEB = "gpud-node.yaml", "gpud-node-deb.yaml"
GPUD_YAML = "/etc/gpud/gpud.yaml"


def cloud_init_binary() -> str:
    """The cloud-init binary. CI installs it, so there its absence fails the test (as
    ``shared_fixture`` does); elsewhere the test skips, saying how to get it."""
    path = shutil.which("cloud-init")
    if path is None:
        unavailable("cloud-init is not installed here (apt-get install cloud-init)")
    return path


def text(name: str) -> str:
    return (CLOUD_INIT_DIR / name).read_text(encoding="utf-8")


def user_data(name: str) -> dict[str, Any]:
    data = yaml.safe_load(text(name))
    assert isinstance(data, dict)
    return data


def gpud_yaml_entry(data: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [f for f in data["write_files"] if f["path"] == GPUD_YAML]
    return entry


def runcmd(data: dict[str, Any]) -> list[str]:
    """runcmd as the lines of the script cloud-init writes (list items are argv)."""
    return [" ".join(c) if isinstance(c, list) else c for c in data["runcmd"]]


def schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cloud_init_binary(), "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", [APT, DEB])
def test_cloud_init_accepts_the_user_data(name: str) -> None:
    out = schema(CLOUD_INIT_DIR / name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Valid cloud-config" in out.stdout


@pytest.mark.parametrize(
    ("mistake", "replace", "by"),
    [
        # cloud-init 22.4 only warns about an unknown top-level key, but a write_files entry
        # allows no other keys: a misspelt one there is an error
        ("misspelt write_files key", "    content: |", "    contents: |"),
        ("wrong type", "runcmd:\n", "runcmd: gpud bootstrap\nbootcmd:\n"),
    ],
    ids=["misspelt-key", "wrong-type"],
)
def test_cloud_init_rejects_a_broken_copy(
    tmp_path: Path, mistake: str, replace: str, by: str
) -> None:
    original = text(APT)
    assert replace in original, mistake
    broken = tmp_path / APT
    broken.write_text(original.replace(replace, by, 1), encoding="utf-8")
    out = schema(broken)
    assert out.returncode != 0, mistake
    assert "schema errors" in out.stdout + out.stderr


@pytest.mark.parametrize("name", [APT, DEB])
def test_embedded_gpud_yaml_is_valid_for_gpud(name: str) -> None:
    config = parse(gpud_yaml_entry(user_data(name))["content"], f"{name}: {GPUD_YAML}")
    assert config.driver.branch
    name_of_layout = config.mig.layout
    assert name_of_layout is not None
    assert name_of_layout in layout.bundled().names  # bootstrap's mig step would refuse it
    assert config.sharing.time_slicing is not None
    # the example shares the very slices the layout makes
    profile = name_of_layout.removeprefix("all-")
    shared = [r.name for r in config.sharing.time_slicing.resources]
    assert shared == [f"nvidia.com/mig-{profile}"]


def test_both_routes_configure_the_same_node() -> None:
    apt, deb = (gpud_yaml_entry(user_data(n))["content"] for n in (APT, DEB))
    assert apt == deb


@pytest.mark.parametrize("name", [APT, DEB])
def test_config_is_written_before_gpud_is_installed(name: str) -> None:
    # deferred, it would be written after `packages`, when gpud already runs on the defaults
    assert gpud_yaml_entry(user_data(name)).get("defer", False) is False


@pytest.mark.parametrize("name", [APT, DEB])
def test_gpud_bootstrap_runs_last_and_cloud_init_does_not_reboot(name: str) -> None:
    data = user_data(name)
    assert runcmd(data)[-1] == "gpud bootstrap"
    assert "power_state" not in data


def test_apt_route_trusts_its_key_for_its_repository_only() -> None:
    data = user_data(APT)
    install = next(line for line in runcmd(data) if "apt-get install" in line)
    assert shlex.split(install)[-2:] == ["gpud", "ubuntu-drivers-common"]
    assert "--force-confold" in install  # dpkg keeps the gpud.yaml written before the install
    # cloud-init's own installs give up after 30 s of a held apt lock: not used for gpud
    assert "packages" not in data
    (source,) = data["apt"]["sources"].values()
    assert source["source"].startswith("deb [signed-by=$KEY_FILE] ")
    assert "BEGIN PGP PUBLIC KEY BLOCK" in source["key"]


def test_deb_route_keeps_the_config_and_stops_at_a_failed_download() -> None:
    lines = runcmd(user_data(DEB))
    assert lines[0] == "set -e"
    download = next(line for line in lines if line.startswith("curl "))
    deb = PurePosixPath(download.split(" -o ")[1].split()[0])
    install = next(line for line in lines if "apt-get install" in line)
    # dpkg stops at the conffile question without it (the file is there before the package)
    assert "--force-confold" in install and " ./gpud.deb" in install
    # ./gpud.deb is the file downloaded, and it is checked before it is installed
    assert lines.index(f"cd {deb.parent}") < lines.index(install)
    checksum = next(i for i, line in enumerate(lines) if "sha256sum -c" in line)
    assert str(deb) in lines[checksum] and checksum < lines.index(install)


@pytest.mark.parametrize("name", [APT, DEB])
def test_the_install_waits_for_the_dpkg_lock_with_apt_s_own_option(
    name: str, tmp_path: Path
) -> None:
    """unattended-upgrades holds dpkg's lock on a first boot: the install line must wait, not
    fail. Its own -o options, given to the real apt-get against a held lock, make apt wait."""
    install = next(line for line in runcmd(user_data(name)) if "apt-get install" in line)
    words = shlex.split(install)
    options = [f"-o {shlex.quote(words[i + 1])}" for i, w in enumerate(words) if w == "-o"]
    assert any(o.startswith("-o DPkg::Lock::Timeout=") for o in options)
    root = tmp_path / "root"
    apt = f"{real_apt_get(root)} {' '.join(options)} check"
    with LockHolder(root / "var/lib/dpkg/lock-frontend", 1.5, scratch=tmp_path) as holder:
        waited = subprocess.run(
            ["/bin/sh", "-c", apt], capture_output=True, text=True, timeout=120, check=False
        )
    assert waited.returncode == 0, waited.stderr
    assert f"It is held by process {holder.pid} ({HOLDER_NAME})" in waited.stdout + waited.stderr
    # the premise: without the option the same apt-get gives up at once
    with LockHolder(root / "var/lib/dpkg/lock-frontend", scratch=tmp_path):
        bare = subprocess.run(
            ["/bin/sh", "-c", f"{real_apt_get(root)} check"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert bare.returncode != 0 and "E: Could not get lock" in bare.stderr


def test_apt_route_retries_the_update_while_the_lists_lock_is_held(tmp_path: Path) -> None:
    """apt-get update takes apt's lists lock, which DPkg::Lock::Timeout does not cover: the
    update line, run as written with the real apt-get, outlasts a holder; the bare update fails."""
    lines = runcmd(user_data(APT))
    assert lines[0] == "set -e"
    update = next(line for line in lines if "apt-get update" in line)
    assert lines.index(update) < next(i for i, x in enumerate(lines) if "apt-get install" in x)
    root = tmp_path / "root"
    line = update.replace("apt-get update", f"{real_apt_get(root)} update")
    lock = root / "var/lib/apt/lists/lock"
    with LockHolder(lock, scratch=tmp_path) as holder:
        bare = subprocess.run(
            ["/bin/sh", "-c", f"{real_apt_get(root)} update"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # let go a few seconds into the retrying line, as unattended-upgrades would
        threading.Timer(3.0, holder.release).start()
        retried = subprocess.run(
            ["/bin/sh", "-c", line], capture_output=True, text=True, timeout=700, check=False
        )
    assert bare.returncode != 0 and "Could not get lock" in bare.stderr, bare.stderr
    assert retried.returncode == 0, retried.stderr
    assert "Could not get lock" in retried.stderr  # it did meet the held lock first


@pytest.mark.parametrize("name", [APT, DEB])
def test_the_commented_lock_timeout_works_once_uncommented(name: str) -> None:
    content = gpud_yaml_entry(user_data(name))["content"]
    lines = content.splitlines()
    at = lines.index("# apt:")
    lines[at : at + 2] = [line.removeprefix("# ") for line in lines[at : at + 2]]
    config = parse("\n".join(lines) + "\n", f"{name}: {GPUD_YAML}")
    assert config.apt.lock_timeout > parse(content, name).apt.lock_timeout
