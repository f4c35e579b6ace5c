"""What an operator looks at: every GPU and MIG device with its reading and the pods holding it.

Shared by ``/metrics`` and ``gpudctl top``, so that a dashboard and a terminal never disagree on
which pod holds which device.
"""
