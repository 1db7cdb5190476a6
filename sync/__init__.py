"""amberflo-sync: keeps Amberflo customers and meters in step with Segment.

The public surface is the command line (``amberflo-sync``); the modules are internal.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
