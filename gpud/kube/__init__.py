"""gpud's link to the Kubernetes API server, with the kubelet's own credentials: who gpud is and
which Node it speaks for (:mod:`access`), what a kubelet credential may change (:mod:`restriction`),
one client every cluster-facing part shares (:mod:`client`), and the publisher that keeps gpud's
labels on its Node (:mod:`publisher`).

Nothing here imports the client library at module level: a node without credentials never pays
for it, and a node with them pays only after kubelet has its device plugins.
"""
