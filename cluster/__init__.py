"""Bringing a cluster up: the local single-machine bring-up, Serve configs, cluster manifests."""
