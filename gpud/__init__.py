"""gpud: one node agent that makes an Ubuntu GPU server usable by Kubernetes.

The package is layered: ``gpud.hw`` is the only code that touches the GPU, ``gpud.resources`` and
``gpud.health`` are pure decisions over values, ``gpud.deviceplugin`` and ``gpud.daemon`` are the
effectful shells, and ``gpud.cli`` is the front door. Imports stay lazy at the top so that
``gpud run`` registers its plugins quickly.
"""

__version__ = "0.1.0"
