"""GitHub Actions: webhook checks and parsing, App auth, the REST client, reconcile.

``webhook`` and ``reconcile`` are pure; ``auth`` and ``api`` do the I/O, over
aiohttp, and translate every failure into ``runner.errors`` forge errors.
"""
