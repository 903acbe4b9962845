"""Split virtqueues (virtio 1.2, 2.7): rings in guest memory, descriptor chains, notifications."""

from vhostfs.virtqueue.split import ChainError, DescriptorChain, QueueBroken, SplitQueue

__all__ = ["ChainError", "DescriptorChain", "QueueBroken", "SplitQueue"]
