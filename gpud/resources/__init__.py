"""Pure decisions about what gpud advertises to kubelet and how it answers kubelet's requests."""
