"""gpud's one client for the API server: lightkube, loaded when first needed, and errors an
operator can act on.

Every part of gpud that talks to the cluster (the labels on the Node now; Events, the node
condition and the MIG label later) goes through :class:`KubeClient`, so they share one
connection, one field manager ("gpud") and one way of saying what went wrong. lightkube is
imported in a worker thread on the first call, never at gpud's start (it costs about 0.2 s of
CPU). The kubelet rotates its client certificate on disk; the client notices that the
credential files changed and connects again with the new ones.

:func:`explain` is pure: an API status code and message become one sentence naming the node,
the identity and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpud.kube.access import Access

log = logging.getLogger(__name__)

FIELD_MANAGER = "gpud"
TIMEOUT_S = 5.0
# A watch is closed by the server this often and opened again from where it was (client-go
# picks 5 to 10 minutes); one that brings nothing, not even that close, for longer is taken for
# a dead connection and read again.
WATCH_SERVER_TIMEOUT_S = 300
WATCH_SILENCE_S = 330.0


@dataclass(frozen=True)
class NodeView:
    """What gpud reads from its Node: its identity, labels, and where a watch goes on from."""

    uid: str
    labels: Mapping[str, str]
    resource_version: str

    @classmethod
    def of(cls, node: Any) -> NodeView:
        meta = node.metadata
        return cls(str(meta.uid), dict(meta.labels or {}), str(meta.resourceVersion or ""))


class KubeError(Exception):
    """A request failed; ``str()`` is the sentence for ``gpudctl status``. ``code`` is the HTTP
    status (0 when the server could not be reached)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class NodeReplaced(KubeError):
    """The Node gpud knew was deleted (and maybe registered again under the same name)."""


def explain(code: int, message: str, access: Access, server: str) -> str:
    """An API error as an operator reads it: what was refused, who asked, what to check."""
    node = access.node_name
    who = access.identity or "the kubeconfig's user"
    if code == 401:
        return (
            f"the API server at {server} does not accept the credential of "
            f"{access.kubeconfig} (401 Unauthorized: expired, revoked or from another "
            "cluster); check that the kubelet itself can still reach the API server"
        )
    if code == 403:
        if "is not allowed to modify node" in message or "only its own Node" in message:
            return (
                f"{who} is not allowed to modify node {node}: node name / credential mismatch "
                f"(node name from {access.node_source}; use this node's kubelet kubeconfig or "
                f"set kubernetes.nodeName to the credential's node). API server: {message}"
            )
        return f"{who} is forbidden to change Node {node} (403): {message}"
    if code == 404:
        return (
            f"Node {node} not found: the kubelet has not registered it yet, or the node name "
            f"(from {access.node_source}) is wrong; kubectl get nodes lists the names"
        )
    if code == 409:
        return (
            f"labels on Node {node} are held by another field manager with other values (409 "
            f"Conflict): {message}; remove them there (kubectl label node {node} KEY-) or stop "
            "the other tool publishing them"
        )
    if code == 429:
        return (
            f"the API server at {server} is throttling gpud (429 Too Many Requests); retrying "
            "with backoff"
        )
    return f"the API server at {server} answered {code}: {message}"


def credential_files(kubeconfig: Path) -> tuple[Path, ...]:
    """The kubeconfig and the files it names (client certificate and key, CA): what the
    kubelet rewrites when it rotates its certificate."""
    files = [kubeconfig]
    try:
        doc = yaml.safe_load(kubeconfig.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return tuple(files)
    entries = [u.get("user") or {} for u in doc.get("users") or ()]
    entries += [c.get("cluster") or {} for c in doc.get("clusters") or ()]
    for entry in entries:
        for key in ("client-certificate", "client-key", "certificate-authority"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str):
                path = Path(entry[key])
                files.append(path if path.is_absolute() else kubeconfig.parent / path)
    return tuple(files)


def _signature(files: tuple[Path, ...]) -> tuple[int, ...]:
    out = []
    for path in files:
        try:
            out.append(path.stat().st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)


def _connect(kubeconfig: Path) -> tuple[Any, str]:
    """A lightkube AsyncClient for ``kubeconfig`` and its server URL (in a worker thread: the
    import and the TLS context cost CPU that kubelet's gRPC must not wait for)."""
    import httpx2
    from lightkube import AsyncClient, KubeConfig

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a journal line per request
    config = KubeConfig.from_file(kubeconfig)
    single = config.get()
    if single is None:
        raise KubeError(f"{kubeconfig} has no current context")
    client = AsyncClient(
        single, field_manager=FIELD_MANAGER, timeout=httpx2.Timeout(TIMEOUT_S), trust_env=False
    )
    return client, single.cluster.server


class KubeClient:
    """The API server as gpud's cluster-facing parts use it, with ``access``'s credentials."""

    def __init__(self, access: Access) -> None:
        if access.kubeconfig is None:
            raise ValueError("the link is off: " + access.off_reason)
        self.access = access
        self.server = ""
        self._kubeconfig = access.kubeconfig
        self._client: Any = None
        self._files = credential_files(self._kubeconfig)
        self._signature: tuple[int, ...] = ()

    async def _ready(self) -> Any:
        signature = _signature(self._files)
        if self._client is not None and signature == self._signature:
            return self._client
        if self._client is not None:
            log.info("credential files of %s changed: connecting again", self._kubeconfig)
            await self.close()
        try:
            self._client, self.server = await asyncio.to_thread(_connect, self._kubeconfig)
        except KubeError:
            raise
        except Exception as exc:  # lightkube's ConfigError, ssl.SSLError, OSError, ...
            raise KubeError(f"cannot use {self._kubeconfig}: {exc}") from exc
        self._signature = signature
        return self._client

    async def node_uid(self) -> str:
        """The UID of gpud's own Node (its identity across a delete and re-registration)."""
        from lightkube.resources.core_v1 import Node

        client = await self._ready()
        node = await self._call(client.get(Node, self.access.node_name))
        return str(node.metadata.uid)

    async def apply_node_labels(self, uid: str, labels: Mapping[str, str]) -> None:
        """Server-side apply of exactly ``labels`` to the Node under field manager "gpud": a
        label gpud applied before and leaves out now is removed, labels of other managers are
        left alone, and a label another manager holds with another value is a conflict (not
        forced). ``uid`` makes the apply refuse to create a Node that is gone
        (:class:`NodeReplaced`)."""
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.access.node_name, "uid": uid, "labels": dict(labels)},
        }
        client = await self._ready()
        request = client.patch(
            Node,
            self.access.node_name,
            body,
            patch_type=PatchType.APPLY,
            field_manager=FIELD_MANAGER,
        )
        await self._call(request)

    async def read_node(self) -> NodeView:
        """gpud's own Node as a watch starts from it (a kubelet credential may get its Node)."""
        from lightkube.resources.core_v1 import Node

        client = await self._ready()
        node = await self._call(client.get(Node, self.access.node_name))
        return NodeView.of(node)

    async def watch_node(self, resource_version: str) -> AsyncIterator[tuple[str, NodeView]]:
        """Changes to gpud's own Node after ``resource_version`` ("ADDED", "MODIFIED",
        "DELETED"), through a watch with the ``metadata.name`` field selector: the one a
        kubelet credential is allowed. Raises :class:`KubeError` when the watch breaks (the
        server gone, a version too old, nothing heard for :data:`WATCH_SILENCE_S`); the caller
        reads the Node again and watches from there."""
        from lightkube.resources.core_v1 import Node

        async for kind, node in self._watch(
            Node, {"metadata.name": self.access.node_name}, resource_version
        ):
            yield kind, NodeView.of(node)

    async def _watch(
        self, kind: Any, fields: Mapping[str, str], resource_version: str
    ) -> AsyncIterator[tuple[str, Any]]:
        """The one watch loop of gpud's watches: renewed by the server every
        :data:`WATCH_SERVER_TIMEOUT_S`, broken (:class:`KubeError`) by an error or by
        :data:`WATCH_SILENCE_S` of silence."""
        client = await self._ready()
        stream = client.watch(
            kind,
            fields=dict(fields),
            resource_version=resource_version,
            server_timeout=WATCH_SERVER_TIMEOUT_S,
        ).__aiter__()
        try:
            while True:
                event, obj = await self._call(asyncio.wait_for(anext(stream), WATCH_SILENCE_S))
                yield str(event), obj
        finally:
            # A cancelled read (gpud stopping) may leave the stream mid-step; closing it then
            # raises RuntimeError, and the response was closed by the cancellation already.
            with contextlib.suppress(RuntimeError):
                await stream.aclose()

    async def set_node_label(self, uid: str, key: str, value: str) -> None:
        """Set one label with a merge patch (as mig-manager writes its state label): owned by
        gpud as an update, never part of the server-side-applied set that
        :meth:`apply_node_labels` prunes. ``uid`` makes it fail (:class:`NodeReplaced`) on a
        Node that was re-created, whose state is not this one's."""
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        body = {"metadata": {"uid": uid, "labels": {key: value}}}
        client = await self._ready()
        request = client.patch(Node, self.access.node_name, body, patch_type=PatchType.MERGE)
        await self._call(request)

    async def node_condition(self, kind: str) -> tuple[str, str, str]:
        """The Node's UID, and the status and lastTransitionTime of its condition ``kind``
        ("", "" when it has none). A kubelet credential may read its Node (not nodes/status):
        the status comes with it."""
        from lightkube.resources.core_v1 import Node

        client = await self._ready()
        node = await self._call(client.get(Node, self.access.node_name))
        for condition in (node.status.conditions if node.status else None) or ():
            if condition.type == kind:
                since = condition.lastTransitionTime
                stamp = since.strftime("%Y-%m-%dT%H:%M:%SZ") if since is not None else ""
                return str(node.metadata.uid), str(condition.status), stamp
        return str(node.metadata.uid), "", ""

    async def apply_node_condition(self, uid: str, condition: Mapping[str, str]) -> None:
        """Server-side apply of one condition to the Node's status subresource under field
        manager "gpud": conditions are a list keyed by type, so kubelet's own (Ready,
        MemoryPressure, ...) are never touched. ``uid`` as for :meth:`apply_node_labels`."""
        from lightkube.resources.core_v1 import NodeStatus
        from lightkube.types import PatchType

        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.access.node_name, "uid": uid},
            "status": {"conditions": [dict(condition)]},
        }
        client = await self._ready()
        request = client.patch(
            NodeStatus,
            self.access.node_name,
            body,
            patch_type=PatchType.APPLY,
            field_manager=FIELD_MANAGER,
        )
        await self._call(request)

    async def create_event(self, event: Mapping[str, Any]) -> bool:
        """Create a core/v1 Event; False when one of its name exists already (an earlier try
        went through but its answer was lost), so a retry never makes a second one."""
        from lightkube.resources.core_v1 import Event

        client = await self._ready()
        try:
            await self._call(client.create(Event.from_dict(dict(event))))
        except KubeError as exc:
            if exc.code == 409:
                return False
            raise
        return True

    # ---- DRA ResourceSlices of this node (a kubelet credential may create, list and watch
    # with the spec.nodeName field selector, patch and delete them; never get one by name).

    def _slice_fields(self, driver: str) -> dict[str, str]:
        return {"spec.nodeName": self.access.node_name, "spec.driver": driver}

    async def list_slices(self, driver: str) -> tuple[list[Any], str]:
        """This node's ResourceSlices of ``driver`` and the list's resourceVersion (where a
        watch goes on from)."""
        from lightkube.resources.resource_v1 import ResourceSlice

        client = await self._ready()

        async def read() -> tuple[list[Any], str]:
            found = client.list(ResourceSlice, fields=self._slice_fields(driver))
            items = [item async for item in found]
            return items, str(found.resourceVersion)

        return await self._call(read())

    async def create_slice(self, body: Mapping[str, Any]) -> Any:
        from lightkube.resources.resource_v1 import ResourceSlice

        client = await self._ready()
        return await self._call(client.create(ResourceSlice.from_dict(dict(body))))

    async def patch_slice(self, name: str, body: Mapping[str, Any]) -> Any:
        """A JSON merge patch: the devices list is replaced whole, as wanted."""
        from lightkube.resources.resource_v1 import ResourceSlice
        from lightkube.types import PatchType

        client = await self._ready()
        patch = {"metadata": {"annotations": body["metadata"]["annotations"]}, "spec": body["spec"]}
        return await self._call(
            client.patch(ResourceSlice, name, patch, patch_type=PatchType.MERGE)
        )

    async def delete_slice(self, name: str) -> None:
        """Delete one slice; one already gone (kubelet wiped it) is no error."""
        from lightkube.resources.resource_v1 import ResourceSlice

        client = await self._ready()
        try:
            await self._call(client.delete(ResourceSlice, name))
        except KubeError as exc:
            if exc.code != 404:
                raise

    async def watch_slices(
        self, driver: str, resource_version: str
    ) -> AsyncIterator[tuple[str, str, str]]:
        """Changes to this node's slices of ``driver`` after ``resource_version``, as (kind,
        name, resourceVersion); raises :class:`KubeError` when the watch breaks, as
        :meth:`watch_node` does."""
        from lightkube.resources.resource_v1 import ResourceSlice

        async for kind, obj in self._watch(
            ResourceSlice, self._slice_fields(driver), resource_version
        ):
            meta = obj.metadata
            yield kind, str(meta.name), str(meta.resourceVersion or "")

    async def resource_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """A ResourceClaim (resource.k8s.io/v1) as a dict. A node identity may get the claims
        of pods bound to its node and no others (the Node authorizer's graph)."""
        from lightkube.resources.resource_v1 import ResourceClaim

        client = await self._ready()
        try:
            claim = await self._call(client.get(ResourceClaim, name, namespace=namespace))
        except KubeError as exc:
            if exc.code == 404:
                raise KubeError(f"ResourceClaim {namespace}/{name} not found", 404) from None
            if exc.code == 403:
                # The Node authorizer answers 403 for a claim that does not exist, too.
                raise KubeError(
                    f"{self.access.identity or 'gpud'} may not read ResourceClaim "
                    f"{namespace}/{name} (403): it does not exist, or it is not a claim of a "
                    f"pod bound to node {self.access.node_name}",
                    403,
                ) from None
            raise
        return dict(claim.to_dict())

    async def _call(self, request: Any) -> Any:
        from lightkube import ApiError

        try:
            return await request
        except ApiError as exc:
            code, message = int(exc.status.code or 0), str(exc.status.message or "")
            if code == 401:
                self._signature = ()  # connect again next time: the certificate may be new
            # A Node deleted since gpud read its UID: the apply is refused as a conflict (409),
            # on the status subresource as a change of the immutable UID (422).
            if code in (409, 422) and "uid" in message:
                raise NodeReplaced(message, code) from None
            raise KubeError(explain(code, message, self.access, self.server), code) from None
        except (StopAsyncIteration, asyncio.CancelledError):
            raise
        except asyncio.TimeoutError:
            raise KubeError(
                f"the API server at {self.server} sent nothing for {WATCH_SILENCE_S:.0f} s"
            ) from None
        except Exception as exc:
            if isinstance(exc, KubeError):
                raise
            # httpx2's transport errors: refused, reset, timed out, TLS.
            raise KubeError(
                f"cannot reach the API server at {self.server}: {exc or type(exc).__name__}"
            ) from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception as exc:
                log.debug("closing the API client: %s", exc)
