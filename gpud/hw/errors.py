"""Hardware errors, named after the NVML return codes they stand for.

Both backends raise these, so code above ``hw`` reacts to "GPU is lost" or "not supported" the same
way whether the GPU is real or simulated.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    UNINITIALIZED = 1
    INVALID_ARGUMENT = 2
    NOT_SUPPORTED = 3
    NO_PERMISSION = 4
    ALREADY_INITIALIZED = 5
    NOT_FOUND = 6
    INSUFFICIENT_SIZE = 7
    DRIVER_NOT_LOADED = 9
    TIMEOUT = 10
    GPU_IS_LOST = 15
    RESET_REQUIRED = 16
    OPERATING_SYSTEM = 17
    LIB_RM_VERSION_MISMATCH = 18
    IN_USE = 19
    INSUFFICIENT_RESOURCES = 23
    LIBRARY_NOT_FOUND = 12
    FUNCTION_NOT_FOUND = 13
    UNKNOWN = 999


class HwError(Exception):
    """A hardware call failed; ``kind`` says how, in NVML's terms."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return f"{super().__str__()} ({self.kind.name})"


class BackendUnavailable(HwError):
    """The backend cannot be used at all (no driver, no library, no permission).

    gpud keeps running and reports the reason instead of crashing: a node without a driver yet is
    the normal state before ``gpud bootstrap``.
    """


UNAVAILABLE_ADVICE: dict[ErrorKind, str] = {
    ErrorKind.LIBRARY_NOT_FOUND: (
        "no NVIDIA driver: libnvidia-ml.so.1 not found; install the driver "
        "(sudo gpudctl driver install) or run with --simulate"
    ),
    ErrorKind.DRIVER_NOT_LOADED: (
        "NVIDIA driver not loaded: libnvidia-ml.so.1 is installed but the nvidia kernel module is "
        "not running; load it (modprobe nvidia) or reboot after installing the driver, and read "
        "`dmesg | grep -i nvrm` if that fails"
    ),
    ErrorKind.NO_PERMISSION: (
        "no permission to use the NVIDIA driver (/dev/nvidiactl could not be opened); "
        "run gpud as root, and under systemd check that its device policy allows the nvidia "
        "device groups (systemctl show gpud -p DeviceAllow; sudo systemctl restart gpud)"
    ),
    ErrorKind.LIB_RM_VERSION_MISMATCH: (
        "NVIDIA driver version mismatch: libnvidia-ml.so.1 and the loaded kernel module come from "
        "different driver versions (usually a driver upgrade without a reboot); reboot the node"
    ),
}
"""The init failures that mean "this node cannot use NVML at all", with what the operator should
do. Both backends answer with these words, so a simulated node without a driver reads like a
real one."""
