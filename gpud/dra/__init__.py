"""gpud as the node's Dynamic Resource Allocation (DRA) driver for GPUs and MIG devices."""
