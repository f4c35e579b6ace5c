"""One node state, many publishers (DESIGN.md).

The daemon owns the node's state and publishes it as immutable :class:`~gpud.node.state.NodeState`
snapshots with typed change events (:mod:`gpud.node.events`). Every audience (kubelet, gpudctl,
metrics, labels, the Kubernetes API) is a publisher (:mod:`gpud.node.hub`) that derives what it
says from those values, sends requests back through one door (:mod:`gpud.node.requests`) and
fails alone. Nothing here imports the daemon or a publisher.
"""
