"""The hardware layer: the only code that imports pynvml or knows how a GPU is reached.

Everything above sees :class:`gpud.hw.backend.Backend` and the value types of
:mod:`gpud.hw.types`; the two implementations (``nvml`` and ``sim``) must look alike to it.
"""
