"""The cnvm wire vocabulary shared by cnvmd, cnvmctl and peer daemons.

`framing` turns msgpack maps into length-prefixed frames and back; `messages`
defines the envelopes (hello, request, response, event, cancel) and the stable
error codes. The format is documented for other languages in proto/README.md.
"""

from proto.framing import MAX_FRAME, FrameDecoder, FrameError, encode_frame, read_frame
from proto.messages import PROTOCOL_VERSION, ErrorCode, ProtoError

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "FrameDecoder",
    "FrameError",
    "ProtoError",
    "encode_frame",
    "read_frame",
]
