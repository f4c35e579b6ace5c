"""The simulated GPU backend: machines that look like NVML to everything above ``hw``.

Lets the daemon, the device plugin and the MIG planner run and be tested on a machine with no GPU.
:mod:`.machines` is the pure catalog of boards and machines; :mod:`.backend` adds the state a real
GPU keeps across a restart (UUIDs, MIG mode, lost boards) and fault injection.
"""
