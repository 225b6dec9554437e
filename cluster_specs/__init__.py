"""Cluster spec JSON files (loaded with ``cost.load_cluster``)."""
