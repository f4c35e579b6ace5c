"""The link to the API server as a publisher: gpud's labels on its own Node.

Each snapshot's labels (GPU Feature Discovery's and ``labels.static``,
:func:`gpud.labels.snapshot.snapshot_labels`) less those NodeRestriction refuses a kubelet
credential are applied to the Node with server-side apply under field manager "gpud": what gpud
stops publishing disappears, what others set stays. An apply is sent only when the wanted set
differs from the last one the API server accepted, so an unchanged node sends nothing.

A failure raises, so the hub shows the link degraded with the sentence from
:func:`gpud.kube.client.explain` and retries with backoff; nothing here ever holds kubelet's link
up. At start the link waits (at most :data:`REGISTRATION_WAIT_S`) until kubelet has the device
plugins, and only then loads the client library, in a worker thread.

Without credentials the link is off and ``gpudctl status`` says why; with ``kubernetes.enabled:
true`` that is an error, retried (a node that joins the cluster after gpud started gets its
kubelet kubeconfig then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from gpud.config.models import Kubernetes
from gpud.kube import access as kube_access
from gpud.kube.access import Access
from gpud.kube.client import KubeError
from gpud.kube.restriction import kubelet_allowed
from gpud.node.hub import PublisherLink, Update
from gpud.node.state import NodeState

if TYPE_CHECKING:
    from gpud.kube.client import KubeClient
    from gpud.kube.miglabel import MigByLabel

log = logging.getLogger(__name__)

REGISTRATION_WAIT_S = 10.0
# While off for want of credentials, look for the kubelet's kubeconfig again this often: a node
# often joins the cluster after gpud was installed (cloud-init, then kubeadm join).
RECHECK_S = 60.0
_POLL_S = 0.05


class LinkOff(Exception):
    """The operator asked for the link (``kubernetes.enabled: true``) and it cannot run."""


def registration_pending(state: NodeState) -> bool:
    """Whether kubelet is still being handed a resource: a resource with no plugin status yet,
    or one whose registration is in flight. A plugin that failed (no kubelet) is not pending."""
    settled = {p.resource for p in state.plugins if p.registered or (p.error and not p.registering)}
    return any(rs.resource not in settled for rs in state.resources)


class KubernetesPublisher:
    name = "kubernetes"

    def __init__(
        self,
        resolve: Callable[[Kubernetes], Access] = kube_access.resolve,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self._resolve = resolve
        self.recheck_s = recheck_s
        self._settings: Kubernetes | None = None
        self._access = Access(None, off_reason="not started")
        self._client: KubeClient | None = None
        self._uid = ""
        # The label set the API server last accepted for self._uid; None: nothing applied yet.
        self._applied: Mapping[str, str] | None = None
        self._warnings: tuple[str, ...] = ()
        self._facts: tuple[tuple[str, ...], str | None, Mapping[str, int]] | None = None
        self._waited = False
        self._recheck: asyncio.TimerHandle | None = None
        self._mig: MigByLabel | None = None

    async def start(self, link: PublisherLink) -> None:
        """Nothing is read before kubelet has its plugins (see :meth:`_await_registration`)."""
        self.link = link
        link.set_detail("starting after kubelet's device-plugin registration")

    async def publish(self, update: Update) -> None:
        """Make the Node's labels match the newest snapshot (``update``'s or a later one)."""
        if not self._waited:
            await self._await_registration()
        state = self.link.latest()
        settings = state.config.kubernetes
        if settings != self._settings or not self._access.on:
            await self._reconfigure(settings)
        if not self._access.on:
            if self._access.required:
                raise LinkOff(f"the API link is off: {self._access.off_reason}")
            if settings.enabled is None and self._recheck is None:
                loop = asyncio.get_running_loop()
                self._recheck = loop.call_later(self.recheck_s, self._look_again)
            return
        await self._follow_mig_label(state)
        wanted, warnings = self._wanted(state)
        if warnings != self._warnings:
            for warning in warnings:
                log.warning("%s", warning)
            self._warnings = warnings
        if wanted == self._applied:
            self._show()
            return
        await self._apply(wanted)

    async def stop(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._mig is not None:
            await self._mig.stop()
            self._mig = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ---- internals -----------------------------------------------------------------------------

    def _look_again(self) -> None:
        self._recheck = None
        self.link.republish()

    def _configure(self, settings: Kubernetes) -> None:
        self._settings = settings
        access = self._resolve(settings)
        if access != self._access:
            log.info("API link: %s", access.describe())
        self._access = access
        self._show()

    async def _reconfigure(self, settings: Kubernetes) -> None:
        before = self._access
        self._configure(settings)
        if self._access != before:
            await self.stop()
            self._uid, self._applied = "", None

    async def _await_registration(self) -> None:
        """Let kubelet get its plugins before gpud loads the client library (gpud's start
        budget is spent on kubelet); bounded, so a plugin that never settles holds nothing."""
        deadline = time.monotonic() + REGISTRATION_WAIT_S
        while registration_pending(self.link.latest()) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        self._waited = True

    def _wanted(self, state: NodeState) -> tuple[dict[str, str], tuple[str, ...]]:
        # Imported here: a node without credentials never loads the label code for this link.
        from gpud.labels.facts import read_machine_type, read_pci_classes
        from gpud.labels.snapshot import snapshot_labels

        bus_ids = tuple(sorted(g.pci_bus_id for g in state.gpus))
        if self._facts is None or self._facts[0] != bus_ids:
            self._facts = (bus_ids, read_machine_type(), read_pci_classes(bus_ids))
        _, machine, classes = self._facts
        labels = snapshot_labels(state, machine, classes)
        allowed, dropped = kubelet_allowed(labels.labels)
        return allowed, dropped

    def _connected(self) -> KubeClient:
        from gpud.kube.client import KubeClient

        if self._client is None:
            self._client = KubeClient(self._access)
        return self._client

    async def _follow_mig_label(self, state: NodeState) -> None:
        """Watch the Node's nvidia.com/mig.config while ``mig.byLabel`` is on and this node can
        do MIG (:mod:`gpud.kube.miglabel`)."""
        wanted = state.config.mig.by_label.enabled and state.mig_status is not None
        if wanted and self._mig is None:
            from gpud.kube.miglabel import MigByLabel

            self._mig = MigByLabel(
                self._connected(),
                self.link.requests,
                lambda: float(self.link.latest().config.mig.by_label.wait_for_pods),
                self._node_seen,
                lambda _: self._show(),
            )
            self._mig.start()
        elif not wanted and self._mig is not None:
            await self._mig.stop()
            self._mig = None
            self._show()

    def _node_seen(self, uid: str) -> None:
        """The watch read the Node: one re-created under the same name gets gpud's labels again
        even when nothing on the node changed."""
        if self._uid and uid != self._uid:
            log.warning("Node %s was re-created; applying its labels again", self._access.node_name)
            self._uid, self._applied = "", None
            self.link.republish()

    async def _apply(self, wanted: dict[str, str]) -> None:
        from gpud.kube.client import NodeReplaced

        client = self._connected()
        for _ in range(2):
            if not self._uid:
                self._uid = await client.node_uid()
                self._applied = None
            try:
                await client.apply_node_labels(self._uid, wanted)
            except NodeReplaced:
                log.warning("Node %s was deleted; looking it up again", self._access.node_name)
                self._uid = ""
                continue
            break
        else:
            raise KubeError(f"Node {self._access.node_name} keeps being replaced; retrying")
        self._applied = wanted
        log.info("applied %d labels to Node %s", len(wanted), self._access.node_name)
        self._show()

    def _show(self) -> None:
        parts = [self._access.describe()]
        if self._access.on and self._applied is not None:
            parts.append(f"{len(self._applied)} labels applied")
        if self._warnings:
            left_out = ", ".join(w.split()[1] for w in self._warnings)
            parts.append(f"not sent (NodeRestriction): {left_out}")
        if self._mig is not None:
            parts.append(self._mig.progress.describe())
        self.link.set_detail("; ".join(parts))
