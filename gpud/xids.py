"""What an XID number means, in a few words an operator can act on.

Facts from NVIDIA's XID documentation (docs.nvidia.com/deploy/xid-errors: the XID table and the
Ampere-and-later XID catalog; the page-retirement guide for 48, 63 and 64). Only the XIDs a
data-centre GPU node commonly reports are listed; for any other number the text says where to
look it up rather than guess. The numbers that gpud ignores by default (application errors,
:data:`gpud.config.models.DEFAULT_IGNORED_XIDS`) are here too: an operator who forces one on
(``health.criticalXids``) still gets its meaning.
"""

from __future__ import annotations

from types import MappingProxyType

XID_MEANINGS = MappingProxyType(
    {
        8: "GPU stopped processing (channel idle timeout)",
        13: "graphics engine exception (usually the application: an illegal access or a bad "
        "kernel)",
        31: "GPU memory page fault (usually the application: an illegal address)",
        32: "invalid or corrupted push buffer stream",
        38: "driver firmware error",
        43: "GPU stopped processing (the application was stopped after an error)",
        44: "graphics engine fault during a context switch",
        45: "preemptive cleanup after an earlier error (a process was stopped)",
        48: "double-bit ECC error: uncorrectable memory error",
        61: "internal micro-controller breakpoint or warning",
        62: "internal micro-controller halt",
        63: "ECC page retirement or row remapping recorded (takes effect after a GPU reset)",
        64: "ECC page retirement or row remapping failed",
        68: "video decoder (NVDEC) exception",
        69: "graphics engine class error",
        74: "NVLink error",
        79: "GPU has fallen off the bus (no longer reachable over PCIe)",
        92: "high single-bit ECC error rate",
        94: "contained ECC error (the affected application was stopped, the GPU keeps running)",
        95: "uncontained ECC error (every application on the GPU is affected; reset the GPU)",
        109: "context switch timeout",
        119: "GSP (GPU System Processor) RPC timeout",
        120: "GSP (GPU System Processor) error",
        154: "GPU recovery action changed (the driver says what the GPU needs: reset, reboot "
        "or drain)",
    }
)


def xid_meaning(xid: int) -> str:
    """The meaning of ``xid`` in a few words; for an XID not in the table, where to read it."""
    known = XID_MEANINGS.get(xid)
    if known is not None:
        return known
    return "not in gpud's table: see NVIDIA's XID catalog (docs.nvidia.com/deploy/xid-errors)"
