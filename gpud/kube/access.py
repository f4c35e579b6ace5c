"""Which credentials gpud uses for the API server, and which Node it speaks for.

A GPU node already holds a credential that is exactly right: the kubelet's. It may read and
label its own Node and nothing else (the Node authorizer and NodeRestriction,
shared/reference/cluster-integration.md §5), so gpud needs no RBAC, ServiceAccount or DaemonSet.
The order, each step only when the one before says nothing:

* kubeconfig: ``gpud run --kubeconfig``, ``kubernetes.kubeconfig``, then the first kubelet
  kubeconfig that exists (:data:`KUBELET_KUBECONFIGS`);
* node name: ``gpud run --node-name``, ``kubernetes.nodeName``, then the name in the kubelet
  credential (a client certificate ``CN=system:node:<name>``, as the API server itself reads
  it), then the hostname lower-cased (what kubelet registers by default).

:func:`resolve` is pure but for reading the kubeconfig and certificate files it names; nothing
here talks to the network or imports the client library.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpud.config.models import Kubernetes

# Where kubelets keep their own kubeconfig, most common first.
KUBELET_KUBECONFIGS: tuple[tuple[str, Path], ...] = (
    ("kubeadm", Path("/etc/kubernetes/kubelet.conf")),
    ("kubelet", Path("/var/lib/kubelet/kubeconfig")),
    ("MicroK8s", Path("/var/snap/microk8s/current/credentials/kubelet.config")),
    ("k3s", Path("/var/lib/rancher/k3s/agent/kubelet.kubeconfig")),
    ("RKE2", Path("/var/lib/rancher/rke2/agent/kubelet.kubeconfig")),
)
NODE_USER_PREFIX = "system:node:"


def kubelet_kubeconfigs(root: Path) -> tuple[tuple[str, Path], ...]:
    """:data:`KUBELET_KUBECONFIGS` below ``root``: the node's own tree is ``/``; a chroot, an
    image being built or a test's fake tree is ``GPUD_ROOT``, as for ``gpud bootstrap``."""
    return tuple((name, root / path.relative_to("/")) for name, path in KUBELET_KUBECONFIGS)


@dataclass(frozen=True, slots=True)
class Access:
    """What the link runs with, or why it is off.

    ``kubeconfig`` None means off; ``off_reason`` then says why in words an operator can act on
    ("no kubeconfig: none of ... exists; set kubernetes.kubeconfig"). ``required`` is True when
    the operator asked for the link (``kubernetes.enabled: true``), so being off is an error.
    ``identity`` is the credential's user when gpud can read it locally (a client certificate's
    CN), "" otherwise (a token).
    """

    kubeconfig: Path | None
    kubeconfig_source: str = ""
    node_name: str = ""
    node_source: str = ""
    identity: str = ""
    off_reason: str = ""
    required: bool = False

    @property
    def on(self) -> bool:
        return self.kubeconfig is not None

    def describe(self) -> str:
        """One line for status: the node, the identity and where both came from."""
        if not self.on:
            return f"off: {self.off_reason}"
        who = self.identity or "a token or exec credential"
        return (
            f"node {self.node_name} ({self.node_source}) as {who}, "
            f"kubeconfig {self.kubeconfig} ({self.kubeconfig_source})"
        )


def resolve(
    cfg: Kubernetes,
    *,
    candidates: tuple[tuple[str, Path], ...] | None = None,
    hostname: Callable[[], str] = socket.gethostname,
) -> Access:
    """The link's credentials and Node name from ``kubernetes.*`` (the command line's
    ``--kubeconfig``/``--node-name`` are already laid over it); the kubelet's kubeconfig is
    looked for among ``candidates``, by default below ``GPUD_ROOT`` (else ``/``)."""
    if candidates is None:
        candidates = kubelet_kubeconfigs(Path(os.environ.get("GPUD_ROOT") or "/"))
    if cfg.enabled is False:
        return Access(None, off_reason="kubernetes.enabled is false in gpud.yaml")
    required = cfg.enabled is True
    if cfg.kubeconfig is not None:
        path, source = cfg.kubeconfig, "configured"
        if not path.is_file():
            why = f"kubernetes.kubeconfig {path} does not exist or is not a file"
            return Access(None, off_reason=why, required=True)
    else:
        found = next(((name, p) for name, p in candidates if p.is_file()), None)
        if found is None:
            looked = ", ".join(str(p) for _, p in candidates)
            why = (
                f"no kubeconfig: this node has no kubelet credentials ({looked}) and "
                "kubernetes.kubeconfig is not set"
            )
            return Access(None, off_reason=why, required=required)
        source, path = f"the kubelet's ({found[0]})", found[1]
    try:
        identity = kubeconfig_identity(path)
    except (OSError, ValueError) as exc:
        return Access(None, off_reason=f"cannot read {path}: {exc}", required=True)
    if cfg.node_name:
        name, name_source = cfg.node_name, "configured"
    elif identity.startswith(NODE_USER_PREFIX):
        name, name_source = identity.removeprefix(NODE_USER_PREFIX), "the kubelet credential's"
    else:
        name, name_source = hostname().lower(), "the hostname"
    return Access(path, source, name, name_source, identity, required=required)


def kubeconfig_identity(path: Path) -> str:
    """The user a kubeconfig's current context authenticates as, when that is a client
    certificate (its CN, as the API server reads it); "" for a token or exec credential.

    Raises ValueError for a file that is not a usable kubeconfig, OSError when it (or the
    certificate it names) cannot be read.
    """
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("not a kubeconfig (no YAML mapping)")
    user = _current_user(doc)
    if "client-certificate-data" in user:
        try:
            pem = base64.b64decode(str(user["client-certificate-data"]), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("client-certificate-data is not base64") from None
    elif "client-certificate" in user:
        cert = Path(str(user["client-certificate"]))
        pem = (cert if cert.is_absolute() else path.parent / cert).read_bytes()
    else:
        return ""
    return certificate_cn(pem)


def _current_user(doc: dict[str, Any]) -> dict[str, Any]:
    current = doc.get("current-context")
    contexts = {c.get("name"): c.get("context") or {} for c in doc.get("contexts") or ()}
    if not current or current not in contexts:
        raise ValueError("its current-context is not set or names no context")
    user_name = contexts[current].get("user")
    users = {u.get("name"): u.get("user") or {} for u in doc.get("users") or ()}
    if user_name not in users:
        raise ValueError(f"its context {current!r} names no user of the file")
    user = users[user_name]
    if not isinstance(user, dict):
        raise ValueError(f"user {user_name!r} is not a mapping")
    return user


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
# The attribute type commonName, 2.5.4.3, as DER encodes it.
_CN_OID = b"\x06\x03\x55\x04\x03"


def certificate_cn(pem: bytes) -> str:
    """The subject's common name of the first certificate in ``pem``; "" when it has none.

    The kubelet's credential file holds its certificate and key together (kubeadm's
    ``kubelet-client-current.pem``); only the certificate block is read. Raises ValueError for
    text with no readable certificate.
    """
    match = _PEM.search(pem)
    if match is None:
        raise ValueError("no PEM certificate in the client certificate")
    try:
        der = base64.b64decode(b"".join(match[1].split()), validate=True)
        cert, _ = _tlv(der, 0)
        tbs, _ = _tlv(cert, 0)
        fields = _children(tbs)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        subject = fields[4][1]  # serial, signature, issuer, validity, subject
    except (IndexError, ValueError, binascii.Error):
        raise ValueError("the client certificate is not a readable X.509 certificate") from None
    for _, rdn in _children(subject):
        for _, attribute in _children(rdn):
            parts = _children(attribute)
            if len(parts) == 2 and _encode(parts[0]) == _CN_OID:
                return parts[1][1].decode("utf-8", errors="replace")
    return ""


def _tlv(data: bytes, at: int) -> tuple[bytes, int]:
    """The content of the DER element at ``at`` and the offset after it."""
    length = data[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise ValueError("truncated DER")
    return data[start:end], end


def _children(data: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 0
    while at < len(data):
        tag = data[at]
        content, at = _tlv(data, at)
        out.append((tag, content))
    return out


def _encode(element: tuple[int, bytes]) -> bytes:
    tag, content = element
    if len(content) >= 0x80:
        raise ValueError("long OID")
    return bytes([tag, len(content)]) + content
