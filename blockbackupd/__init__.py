"""blockbackupd: pull-mode backups of running QEMU VMs.

The daemon serves point-in-time snapshots of a domain's disks, checkpoints
(persistent change tracking) and NBD exports through JSON-RPC on a UNIX
socket. Packages, from the edge inward: ``rpc`` -> ``services`` ->
``qemu`` / ``store`` / ``xml``; ``errors`` and ``model`` are shared by all.
"""

__version__ = "0.1.0"
