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
