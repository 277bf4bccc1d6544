"""Nebula-I: training across two remote clusters over a slow, untrusted WAN.

channel.py      leader-to-leader link: mutual TLS, HMAC-authenticated frames with sequence numbers, resume
compression.py  int8 / top-k with error feedback, chosen from the measured bandwidth
sync.py         the Engine hook: DiLoCo-style outer optimizer on a parameter subset, overlapped exchange
wan.py          WAN emulation for tests and benchmarks: network namespaces, tc shaping, a delaying relay
"""
from ppzoo.distributed.cross_cluster.sync import CrossClusterSync, build_cross_cluster

__all__ = ["CrossClusterSync", "build_cross_cluster"]
