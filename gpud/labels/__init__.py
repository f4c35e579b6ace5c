"""Node labels: GPU Feature Discovery's set computed from what gpud knows, the operator's static
labels, and the NFD local feature file that publishes them."""
