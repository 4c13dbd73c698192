"""Fleet layer: hosts (hostfile) -> SSH -> Ray cluster. Imports nothing of cluster.serving or cluster.commands."""
