"""The Snapfleet guest agent and its wire protocol (standard library only).

This package is copied into guest images as ``/opt/snapfleet/runner/agent/``
and started there by init as ``python3 -m runner.agent``. It must import
nothing outside the standard library and ``runner.agent.*``. The protocol,
shared with the host, is ``runner.agent.protocol``.
"""
