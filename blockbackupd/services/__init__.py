"""The rules of the contract, one service per area (domains, events, ...).

Services speak in the contract's vocabulary and raise :mod:`blockbackupd.errors`;
they know nothing of JSON-RPC, lxml or qemu.qmp.
"""
