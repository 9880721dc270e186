"""The Snapfleet guest agent and its wire protocol (standard library only).

This package is copied into guest images as ``/opt/snapfleet/runner/agent/``
and started there by init as ``python3 -m runner.agent``. It must import
nothing outside the standard library and ``runner.agent.*``.
"""

from runner.agent.protocol import (
    MAX_FRAME_SIZE,
    MAX_OUTPUT_DATA,
    PROTOCOL_VERSION,
    STDERR,
    STDOUT,
    AgentProtocolError,
    Cancel,
    Configure,
    Connection,
    Error,
    Event,
    Exec,
    Exited,
    FrameKind,
    Hello,
    Message,
    Ok,
    Output,
    Ping,
    Pong,
    PutFile,
    Role,
    Shutdown,
    encode_output,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_OUTPUT_DATA",
    "PROTOCOL_VERSION",
    "STDERR",
    "STDOUT",
    "AgentProtocolError",
    "Cancel",
    "Configure",
    "Connection",
    "Error",
    "Event",
    "Exec",
    "Exited",
    "FrameKind",
    "Hello",
    "Message",
    "Ok",
    "Output",
    "Ping",
    "Pong",
    "PutFile",
    "Role",
    "Shutdown",
    "encode_output",
]
