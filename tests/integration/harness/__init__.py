"""Test harness driving the real parts: docker-registry, skopeo, containerd, dockerd and p2pcache nodes.

Everything here starts real processes on loopback ports with private temporary directories and stops them
again; nothing touches the machine's own daemons, and nothing talks to anything but 127.0.0.1.
"""
