"""hiredis-drain: the pub/sub messages one socket read brought, taken whole
from hiredis' buffer.

redis-py's `PubSub.get_message` hands out one message a call and costs
several times what the message does (a health check, parse_response, the
dict it builds); a burst of expired events brings one message per order,
hundreds to a socket read. After each get_message, `HiredisDrain.drain`
takes the replies that are already whole in the connection's hiredis reader.

The private parts of redis-py it uses, every one checked at start (`_check`):

* ``Connection._parser``, an instance of
  ``redis._parsers.hiredis._AsyncHiredisParser`` when hiredis is installed;
* the parser's ``_reader`` (the ``hiredis.Reader`` it makes in
  ``on_connect``) and the reader's ``gets``;
* ``redis._parsers.hiredis.NOT_ENOUGH_DATA``: the object redis-py hands
  hiredis as ``Reader(notEnoughData=...)``; ``gets()`` returns it once the
  buffer holds no whole reply, and nothing else ends the loop. The check
  probes it: a parser set up as redis-py sets one up must answer an empty
  buffer with exactly that object and a fed message with the message.

At run time the loop takes at most `MAX_REPLIES` replies a call (then the
caller yields to the event loop and calls again). A reply it does not
understand (neither the marker nor a RESP2 array nor an error: redis-py no
longer hands hiredis the marker) or a failure of the private parts turns the
path off for good: `FastPaths.fall_back`, `lost` is called (the reply in hand
is gone), and the caller reads on through get_message.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.exceptions import RedisError

from listener.fastpath import FastPaths, Spec, Unfit, require

try:
    from redis._parsers import hiredis as _redis_hiredis
except ImportError:  # another redis-py: _check says so
    _redis_hiredis = None  # type: ignore[assignment]

NAME = "hiredis-drain"
TESTED = {"redis": "8.1", "hiredis": "3.5"}
# Replies taken per call. A socket read (64 KiB) brings about a thousand
# `expired` events: one call usually takes them all, and a fuller buffer
# never keeps the event loop for long.
MAX_REPLIES = 2000
_PROBE_MESSAGE = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nd\r\n"


def _check() -> None:
    if _redis_hiredis is None:
        raise Unfit("redis._parsers.hiredis cannot be imported")
    require(_redis_hiredis, ("_AsyncHiredisParser", "NOT_ENOUGH_DATA"), "redis._parsers.hiredis")
    parser_class = _redis_hiredis._AsyncHiredisParser
    require(parser_class, ("_reader", "on_connect", "on_disconnect"), "_AsyncHiredisParser")
    import hiredis
    from redis.asyncio.connection import Connection

    require(hiredis.Reader, ("gets", "feed"), "hiredis.Reader")
    connection = Connection(protocol=2)  # what a subscription client makes; never connected
    require(connection, ("_parser",), "redis.asyncio.connection.Connection")
    parser = connection._parser
    if not isinstance(parser, parser_class):
        raise Unfit(f"a connection's parser is {type(parser).__name__}, not _AsyncHiredisParser")
    parser.on_connect(connection)  # type: ignore[no-untyped-call]  # makes the reader, handing it the marker
    try:
        reader = parser._reader
        marker = _redis_hiredis.NOT_ENOUGH_DATA
        if reader is None or reader.gets() is not marker:
            raise Unfit("an empty hiredis reader does not answer with redis-py's NOT_ENOUGH_DATA")
        reader.feed(_PROBE_MESSAGE)
        if reader.gets() != [b"message", b"c", b"d"] or reader.gets() is not marker:
            raise Unfit("a pub/sub message does not come out of the hiredis reader as [type, channel, data]")
    finally:
        parser.on_disconnect()  # type: ignore[no-untyped-call]


SPEC = Spec(NAME, TESTED, _check)


class HiredisDrain:
    """The drain of one listener (decided once per daemon's registry)."""

    def __init__(self, fast_paths: FastPaths, lost: Callable[[], None]) -> None:
        self._fast_paths = fast_paths
        self._lost = lost  # called on falling back: a reply taken from the buffer may be gone
        self.active = fast_paths.decide(SPEC).fast
        self.taken = 0  # messages handed out

    def drain(self, connection: object, on_message: Callable[[bytes, bytes], None]) -> bool:
        """Hand `on_message(channel, data)` each message already whole in the
        hiredis buffer of `connection` (a pub/sub connection speaking RESP2).
        True when it stopped at `MAX_REPLIES` (more may be buffered: yield to
        the event loop, then call again); an error reply or a broken
        connection is raised, as get_message would."""
        if not self.active or connection is None:
            return False
        gets = self._reader_gets(connection)
        if gets is None:
            return False
        marker = _redis_hiredis.NOT_ENOUGH_DATA
        for _ in range(MAX_REPLIES):
            try:
                reply = gets()
            except RedisError:
                raise  # hiredis found the stream itself broken (InvalidResponse): as get_message would
            except Exception as exc:
                self._fall_back(f"hiredis' gets() raised {type(exc).__name__}: {exc}")
                return False
            if reply is marker:
                return False
            if isinstance(reply, list):
                if len(reply) == 3 and reply[0] == b"message":
                    self.taken += 1
                    on_message(reply[1], reply[2])
                continue  # a subscription's confirmation or a PING's reply
            if isinstance(reply, BaseException):
                raise reply  # an error reply or a broken connection, as get_message would
            self._fall_back(f"hiredis' gets() answered {repr(reply)[:60]}, not redis-py's NOT_ENOUGH_DATA")
            return False
        return True

    def _reader_gets(self, connection: object) -> Callable[[], object] | None:
        """The `gets` of the hiredis reader under `connection`, looked up at
        every drain: a reconnect makes a new parser and reader. None while not
        connected yet (get_message connects) or after falling back."""
        assert _redis_hiredis is not None  # the check passed
        try:
            parser = connection._parser  # type: ignore[attr-defined]
            if not isinstance(parser, _redis_hiredis._AsyncHiredisParser):
                self._fall_back(f"the subscription's parser is {type(parser).__name__}")
                return None
            reader = parser._reader
            if reader is None:
                return None
            gets: Callable[[], object] = reader.gets
            return gets
        except Exception as exc:
            self._fall_back(f"{type(exc).__name__}: {exc}")
            return None

    def _fall_back(self, why: str) -> None:
        self.active = False
        self._fast_paths.fall_back(NAME, why)
        self._lost()
