"""A Python that an unprivileged user can run gpud's client with, wherever the checkout lies.

Some tests prove that gpud refuses a caller that is not root: they run gpudctl as uid 65534.
That user often cannot read the checkout (a clone in a home directory or a ``mktemp -d``
folder, mode 0700) nor the interpreter the venv links to (pyenv under ``/root``, mode 0700), and
then the refusal would come from the filesystem, not from gpud, and the test would prove
nothing. So the client runs from a world-readable view made once per session under ``/tmp``:
the venv's base interpreter with its standard library, the venv's packages and the checkout's
gpud, hard-linked (copied where the filesystem does not allow links) into fresh 0755
directories. The caller's credentials are uid 65534's all the same: that is what gpud judges.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ReadableClient:
    python: Path
    env: dict[str, str]

    def argv(self, uid: int, *args: str) -> list[str]:
        """Run ``python -S args`` as ``uid`` (group 0, no others: the socket's group decides)."""
        as_user = ["setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups"]
        return [*as_user, str(self.python), "-S", *args]


def _link(src: str, dst: str) -> None:
    """A hard link where the file is world-readable, else a world-readable copy."""
    if os.stat(src).st_mode & stat.S_IROTH:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
    os.chmod(dst, os.stat(dst).st_mode | 0o444)


def _tree(src: Path, dst: Path, *leave_out: str) -> None:
    ignore = shutil.ignore_patterns(*leave_out)
    shutil.copytree(src, dst, ignore=ignore, copy_function=_link, symlinks=True)


@functools.cache
def readable_client() -> ReadableClient:
    view = Path(tempfile.mkdtemp(prefix="gpud-client-", dir="/tmp"))
    atexit.register(shutil.rmtree, view, True)
    view.chmod(0o755)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    # The interpreter finds its standard library beside itself (../lib/pythonX.Y/os.py), as
    # in its own installation; a shared libpython comes along (its RPATH may be unreadable).
    base = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    (view / "bin").mkdir()
    _link(str(base), str(view / "bin" / version))
    _tree(Path(sysconfig.get_paths()["stdlib"]), view / "lib" / version, "site-packages", "test")
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent")
    for lib in libdir.glob(f"lib{version}*.so*"):
        _link(str(lib), str(view / "lib" / lib.name))
    # The venv's packages (not the editable install's hook into the checkout) and gpud itself.
    _tree(Path(sysconfig.get_paths()["purelib"]), view / "site", "__editable__*")
    _tree(REPO / "gpud", view / "site/gpud", "__pycache__")
    for directory in [view, *view.rglob("*")]:
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(view / "site"),
        "LD_LIBRARY_PATH": str(view / "lib"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return ReadableClient(view / "bin" / version, env)
