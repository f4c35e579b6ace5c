"""The one door into the daemon: what a publisher (or gpudctl, through the control API) may ask.

DESIGN.md: inputs come back in through the same door as ``gpudctl mig apply``, a request to the
reconcile loop, never a side path to the MIG applier or the health record. The daemon implements
:class:`NodeRequests`; publishers get it as ``PublisherLink.requests`` and nothing else of the
daemon. Answers are values (or the exceptions named here), and every request that changes the
node returns once a snapshot reflecting it has been published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gpud.hw.types import GpuInfo
    from gpud.mig.planner import Step
    from gpud.node.events import PluginRegistered
    from gpud.node.state import NodeState, PluginStatus


class Unavailable(Exception):
    """The request cannot be served on this node now (no driver, a backend without MIG)."""


class Refused(Exception):
    """A MIG request refused before any change; ``kind`` as in :class:`Outcome`."""

    def __init__(
        self,
        message: str,
        kind: str,
        in_use_by: Sequence[str] = (),
        steps: tuple[Step, ...] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.in_use_by = tuple(in_use_by)
        self.steps = steps


# Who asks for a layout; recorded with the selection and shown by `gpudctl mig show`.
ORIGIN_CLI = "gpudctl mig apply"
ORIGIN_LABEL = "the Node label nvidia.com/mig.config"
ORIGIN_CONFIG = "mig.layout in gpud.yaml"


@dataclass(frozen=True)
class MigRequest:
    """A layout to apply or compare: ``config_name`` in mig-parted's format. ``config_yaml`` is
    the file's text when the caller sends one (even ""), None for gpud's configured or bundled
    layouts; ``config_source`` says where the text came from, for messages and the record."""

    config_name: str
    config_yaml: str | None = None
    config_source: str = ""
    dry_run: bool = False
    # Skip the in-use checks (pods, processes) and the strategy check.
    force: bool = False
    origin: str = ORIGIN_CLI
    # While pods hold devices the layout destroys, try again until this many seconds have
    # passed (then fail naming them); 0 fails at once.
    wait_for_pods_s: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What an apply did; ``result`` is applied, unchanged, planned (dry run) or failed."""

    result: str
    mutations: int = 0
    steps: tuple[Step, ...] = ()
    message: str = ""
    # invalid (the layout is wrong or does not fit), refused (in use), error (a step failed)
    error_kind: str = ""
    in_use_by: tuple[str, ...] = ()


class NodeRequests(Protocol):
    async def set_healthy(self, uuid: str) -> tuple[GpuInfo, str]:
        """Return a GPU (with its MIG devices) or one MIG device to service; the physical GPU and
        what happened. KeyError when the UUID is not on this node, LookupError (with what to do)
        when it cannot be returned."""
        ...

    async def apply_mig(self, request: MigRequest) -> Outcome:
        """Apply (or plan, ``dry_run``) a layout; a refusal or failure is an Outcome, not an
        exception. Unavailable when this node cannot do MIG now."""
        ...

    def mig_label(self, value: str | None) -> None:
        """The Node's ``nvidia.com/mig.config`` as the API link last read it; None when the Node
        has none or the link stopped reading it. While it is set, the label chooses the layout
        and an apply from any other origin is refused."""
        ...

    async def assert_mig(self, request: MigRequest) -> tuple[str, ...]:
        """Where the GPUs differ from a layout, one line per GPU, () when they hold it; without
        waiting for an apply in progress. Refused for a bad layout, Unavailable as above."""
        ...

    async def refresh_mig(self) -> NodeState:
        """Read the MIG layouts from the GPUs again (between applies, never half-way through
        one) and return the snapshot that has them."""
        ...

    async def reload(self) -> Path | None:
        """Re-read the configuration file; the file read (None: defaults). Raises
        gpud.config.load.ConfigError and keeps the running configuration when it is bad."""
        ...

    async def reconciled(self) -> NodeState:
        """Wait for a reconcile pass that starts after this call (so that what a fault just
        injected into the backend has been handled) and return its snapshot."""
        ...

    def plugins_changed(
        self, plugins: tuple[PluginStatus, ...], registered: tuple[PluginRegistered, ...] = ()
    ) -> None:
        """The kubelet link reports its plugins' state and any registrations kubelet accepted."""
        ...
