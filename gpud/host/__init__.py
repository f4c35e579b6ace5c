"""Host setup: what gpud reads and changes on the node itself (platform, driver, container toolkit).

Modules split into a pure core (facts or text in, decisions or text out, e.g.
:mod:`gpud.host.containerd`) and a thin effectful shell (e.g. :mod:`gpud.host.toolkit`) that reads,
backs up, writes atomically and runs commands, so the decisions are testable without a node and
the side effects stay in one small place.
"""
