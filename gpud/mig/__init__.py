"""MIG: layouts (mig-parted's format), the minimal-change planner, and the crash-safe applier."""
