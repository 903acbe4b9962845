"""vhostfs: a virtio-fs (vhost-user) and FUSE file server, and a library for writing your own."""

__version__ = "0.1.0"
