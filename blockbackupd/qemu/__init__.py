"""QEMU access: one QMP session per domain, and queries of its block graph."""
