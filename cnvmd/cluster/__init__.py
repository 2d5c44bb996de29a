"""Cluster-wide view: directory of cnvms, any-node routing, placement, evacuate."""
