"""Snapfleet: ephemeral CI runner fleet, one snapshot-restored microVM per job.

This module stays import-free: the guest agent (``runner.agent``) is copied
into guest images and must import with nothing but the standard library.
"""

__version__ = "0.1.0"
