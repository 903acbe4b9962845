"""File systems that serve host files: the passthrough of a shared directory and its tables, and the
overlay of such layers.

This package is the only part of vhostfs that touches host files.
"""

from vhostfs.fs.overlay import OverlayFs
from vhostfs.fs.passthrough import Passthrough

__all__ = ["OverlayFs", "Passthrough"]
