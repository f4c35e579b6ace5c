"""The long-running side of gpud: the reconcile loop, the control API and systemd integration."""
