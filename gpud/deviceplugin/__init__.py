"""The kubelet-facing side: one v1beta1 device-plugin gRPC server per resource name.

The servers answer from immutable snapshots handed to them by the daemon; they never reach into the
hardware layer, so kubelet's calls cost a dictionary lookup and a protobuf encode.
"""
