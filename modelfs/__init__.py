"""modelfs: a read-only FUSE filesystem that streams model weights from object storage.

Reads become ranged GETs into a bounded memory block cache that spills to a bounded,
checksummed disk cache, so the daemon's memory never grows with the size of the model.
"""

__version__ = "0.1.0"
