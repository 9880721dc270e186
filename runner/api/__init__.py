"""The local control API (aiohttp over a unix socket) and its client."""
