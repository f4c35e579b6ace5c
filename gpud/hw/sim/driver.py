"""The simulated node's NVIDIA driver: installed, loaded, or neither, as ``nvmlInit`` finds it.

gpud often starts before the driver: on first boot, while ``gpud bootstrap`` installs it, or when
the module loads late. To test that path, a simulated node keeps this one fact in
``<state_dir>/sim/driver`` (no file: loaded, as every other simulation assumes), and its device
nodes in ``<state_dir>/sim/dev``, the simulated ``/dev`` the daemon watches. The fact is read only
when the backend opens, as NVML reads the driver only in ``nvmlInit``: a driver cannot go away
under an open NVML (the kernel refuses to unload a module in use).

A test stages what the kernel and udev do: :func:`set_driver` with ``LOADED`` is the module
loading, and creating :func:`control_node` is udev (or ``nvidia-modprobe``) making
``/dev/nvidiactl``.
"""

from __future__ import annotations

import enum
from pathlib import Path

from gpud.atomic import write_atomic
from gpud.hw.backend import DriverSignals

CONTROL_NODE = "nvidiactl"


class DriverState(enum.Enum):
    LOADED = "loaded"
    # libnvidia-ml.so.1 installed, nvidia.ko not loaded: nvmlInit answers DRIVER_NOT_LOADED.
    NOT_LOADED = "not-loaded"
    # No driver package at all: pynvml cannot load the library (LIBRARY_NOT_FOUND).
    NOT_INSTALLED = "not-installed"


def driver_file(state_dir: Path) -> Path:
    return state_dir / "sim" / "driver"


def dev_dir(state_dir: Path) -> Path:
    return state_dir / "sim" / "dev"


def signals(state_dir: Path) -> DriverSignals:
    """Where the simulated driver shows itself: the same module name as a real one, so nothing
    above ``hw`` can tell them apart, and the simulated ``/dev``."""
    return DriverSignals(module="nvidia", dev_dir=dev_dir(state_dir), control_node=CONTROL_NODE)


def control_node(state_dir: Path) -> Path:
    return dev_dir(state_dir) / CONTROL_NODE


def read_driver(state_dir: Path) -> DriverState:
    """The recorded state; ValueError naming the file when it holds anything else, OSError when it
    cannot be read. No file (or no ``sim`` directory) is a loaded driver."""
    path = driver_file(state_dir)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return DriverState.LOADED
    try:
        return DriverState(text)
    except ValueError:
        known = ", ".join(s.value for s in DriverState)
        raise ValueError(f"{path} says {text!r}; expected one of {known}") from None


def set_driver(state_dir: Path, driver: DriverState) -> None:
    """Record ``driver`` for the next ``open``; safe while a gpud without a driver runs, since that
    gpud only reads it. An unloaded driver has no device nodes, so its control node goes."""
    dev_dir(state_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(driver_file(state_dir), f"{driver.value}\n".encode())
    if driver is not DriverState.LOADED:
        control_node(state_dir).unlink(missing_ok=True)
