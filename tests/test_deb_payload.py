"""How the package's payload is decided (scripts/deb_payload.py), and a build that cannot find
every CPython it needs failing at once, naming them.

The payload itself, built, is checked by tests/test_package.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.deb_payload import (
    SUPPORTED,
    common_distributions,
    common_top_levels,
    depends,
    platform_tags,
    split_lock,
)

ROOT = Path(__file__).resolve().parent.parent


def test_depends_spans_every_supported_python3() -> None:
    assert SUPPORTED == ("3.10", "3.11", "3.12", "3.13")
    assert depends() == "python3 (>= 3.10~), python3 (<< 3.14)"


def test_wheels_must_load_on_ubuntu_22_04s_glibc() -> None:
    tags = platform_tags("x86_64")
    assert "manylinux_2_35_x86_64" in tags and "manylinux_2_36_x86_64" not in tags
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux1_aarch64" not in platform_tags("aarch64")
    assert "manylinux2014_aarch64" in platform_tags("aarch64")


def test_the_lock_splits_into_wheels_and_sources_with_every_hash() -> None:
    lock = (ROOT / "packaging/requirements.lock").read_text()
    wheels, sources = split_lock(lock, ["systemd_python"])
    assert sources.startswith("systemd-python==") and "--hash=sha256:" in sources
    assert "systemd-python" not in wheels and "grpcio==" in wheels
    hashes = lock.count("--hash=sha256:")
    assert wheels.count("--hash=sha256:") + sources.count("--hash=sha256:") == hashes


def test_a_distribution_is_common_only_when_every_abi_has_the_same_files() -> None:
    same, other = b"a.py,sha256=x,1\n", b"a.py,sha256=y,1\n"
    records = {
        "cp310": {"pure-1.dist-info": same, "compiled-1.dist-info": same},
        "cp311": {"pure-1.dist-info": same, "compiled-1.dist-info": other},
        "cp312": {"pure-1.dist-info": same, "compiled-1.dist-info": same},
    }
    assert common_distributions(records) == {"pure-1.dist-info"}
    missing = {"cp310": {"only-here-1.dist-info": same}, "cp311": {}}
    assert common_distributions(missing) == set()


def test_a_build_without_every_cpython_stops_at_once_naming_them(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYENV_ROOT": str(tmp_path / "no-pyenv")}
    env.pop("GPUD_PYTHONS", None)
    out = subprocess.run(
        [str(ROOT / "scripts/build-deb"), "--no-deps", "--out", str(tmp_path / "dist"),
         "--python", f"3.10={tmp_path / 'python3.10'}"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert out.returncode != 0
    assert f"CPython 3.10: {tmp_path / 'python3.10'}: " in out.stderr, out.stderr
    assert "pyenv install" in out.stderr and "--python 3.X=" in out.stderr
    assert not list((tmp_path / "dist").glob("*.deb"))


def test_a_top_level_two_distributions_install_into_moves_once_and_only_when_both_are_shared() -> (
    None
):
    owners = {
        "lightkube-1.0.1.dist-info": {"lightkube", "lightkube-1.0.1.dist-info"},
        "lightkube_models-1.36.3.8.dist-info": {"lightkube", "lightkube_models-1.36.3.8.dist-info"},
        "grpcio-1.dist-info": {"grpc", "grpcio-1.dist-info"},
    }
    both = {"lightkube-1.0.1.dist-info", "lightkube_models-1.36.3.8.dist-info"}
    assert common_top_levels(owners, both) == {
        "lightkube",
        "lightkube-1.0.1.dist-info",
        "lightkube_models-1.36.3.8.dist-info",
    }
    one = {"lightkube-1.0.1.dist-info"}
    assert common_top_levels(owners, one) == {"lightkube-1.0.1.dist-info"}
