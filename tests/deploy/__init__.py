"""Offline checks of what ships the service: the container image recipe and the
Kubernetes manifests, against each other and against the code."""
