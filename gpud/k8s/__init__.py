"""Talking to the local kubelet beyond the device-plugin API (PodResources)."""
