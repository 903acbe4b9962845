"""The vhost-user protocol (QEMU docs/interop/vhost-user.rst), back-end side.

Nothing here knows about virtqueues or FUSE: the handler hands ring parameters and guest memory to a
`Backend` (vhostfs.device), which does.
"""
