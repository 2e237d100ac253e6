# The hot path of pushsvc: decode a Kafka record once, serialize it once, frame
# it once, and write the same bytes to every connection it belongs to.
#
# Everything here runs on the event loop thread except BatchHandoff.push, which
# the Kafka consumer thread calls. picows transports are touched only from the
# loop thread (picows checks this itself in send()/send_close(); our direct
# _fast_write path does not, so a debug build asserts it here).

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport qsort
from libc.string cimport memcpy, memmove
from libc.time cimport time_t, tm
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from picows.picows cimport WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

import base64
import binascii
import collections
import heapq
import operator
import logging
import uuid
import zlib

import orjson

cdef extern from "<time.h>" nogil:
    tm* gmtime_r(const time_t* timep, tm* result)

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t)

cdef extern from "<sys/socket.h>" nogil:
    int setsockopt(int fd, int level, int name, const void* value, unsigned int size)
    int SOL_SOCKET
    int SO_SNDBUF

cdef extern from "<endian.h>" nogil:
    uint64_t htobe64(uint64_t)

cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident()

cdef extern from *:
    """
    #ifndef PUSHSVC_DEBUG
    #define PUSHSVC_DEBUG 0
    #endif
    """
    const int PUSHSVC_DEBUG

cdef:
    object _loads = orjson.loads
    object _dumps = orjson.dumps
    object _JSONDecodeError = orjson.JSONDecodeError
    object _uuid4 = uuid.uuid4
    object _logger = logging.getLogger("pushsvc.router")

    # The topics whose name says what their records are, for producers that
    # leave "type" out of the value.
    dict _TOPIC_KINDS = {
        "market-data.prices": KIND_MARKET_PRICE,
        "trading.pnl": KIND_PNL_UPDATE,
        "trading.positions": KIND_POSITION_UPDATE,
        "risk.rule-status": KIND_RULE_STATUS,
        "risk.violations": KIND_VIOLATION,
        "assessment.status": KIND_ASSESSMENT_UPDATE,
    }
    dict _TYPE_KINDS = {
        "market_price": KIND_MARKET_PRICE,
        "pnl_update": KIND_PNL_UPDATE,
        "position_update": KIND_POSITION_UPDATE,
        "rule_status": KIND_RULE_STATUS,
        "violation": KIND_VIOLATION,
        "assessment_update": KIND_ASSESSMENT_UPDATE,
    }
    tuple _KIND_NAMES = (
        None, "market_price", "pnl_update", "position_update",
        "rule_status", "violation", "assessment_update",
    )
    tuple _DROP_REASONS = (
        None, "invalid_json", "not_object", "unknown_type",
        "missing_assessment", "kafka_error",
    )
    tuple _IGNORED_REASONS = (
        "invalid_json", "not_object", "unknown_type", "binary", "fragmented",
    )

    # snake_case -> camelCase, memoized. A hostile producer could send endless
    # distinct keys, so the memo stops growing at a fixed size.
    dict _CAMEL = {}
    Py_ssize_t _CAMEL_MAX = 4096

    # Frames are written with their header in front; 10 bytes covers any length.
    Py_ssize_t _MAX_HEADER = 10
    # A coalescing buffer that grew past this is given back after its flush.
    Py_ssize_t _KEEP_BUF_BYTES = 65536
    double _INVALID_WINDOW_S = 10.0
    # How long a server-initiated close waits for the client's close frame.
    double _CLOSE_GRACE_S = 1.0
    # ...and how long its queued data may take to leave before we abort.
    double _ABORT_GRACE_S = 5.0
    double _DROP_LOG_INTERVAL_S = 1.0

KIND_NAMES = _KIND_NAMES[1:]
DROP_REASONS = _DROP_REASONS[1:]
IGNORED_REASONS = _IGNORED_REASONS
CLOSE_HEARTBEAT_TIMEOUT = 4000
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double _epoch_s() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int64_t _epoch_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cpdef double monotonic():
    """The router's clock (``CLOCK_MONOTONIC``, seconds)."""
    return _monotonic()


cpdef str iso_utc(int64_t ms):
    """Epoch milliseconds as ISO-8601 UTC with milliseconds, e.g.
    ``2026-11-26T10:58:11.123Z``."""
    cdef time_t secs
    cdef int millis
    cdef tm parts
    cdef char buf[40]
    cdef int n
    if ms < 0:
        ms = 0
    secs = <time_t>(ms // 1000)
    millis = <int>(ms % 1000)
    gmtime_r(&secs, &parts)
    n = snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                 parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday,
                 parts.tm_hour, parts.tm_min, parts.tm_sec, millis)
    return PyUnicode_DecodeASCII(buf, n, NULL)


cpdef str camel(str key):
    """``unrealized_pnl`` -> ``unrealizedPnl``; leading underscores are kept."""
    cached = _CAMEL.get(key)
    if cached is not None:
        return <str>cached
    cdef str out
    cdef str stripped
    cdef list parts
    if "_" not in key:
        out = key
    else:
        stripped = key.lstrip("_")
        parts = stripped.split("_")
        out = key[:len(key) - len(stripped)] + parts[0] + "".join(
            [p[:1].upper() + p[1:] for p in parts[1:]])
    if len(_CAMEL) < _CAMEL_MAX:
        _CAMEL[key] = out
    return out


cpdef bytes make_frame(bytes payload):
    """A complete unmasked server TEXT frame (header + payload) for ``payload``.

    Built once per event, then written as-is to every target connection.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t header = 2 if size < 126 else (4 if size < 65536 else 10)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, header + size)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(frame)
    cdef uint16_t len16
    cdef uint64_t len64
    out[0] = 0x80 | <uint8_t>WSMsgType.TEXT
    if header == 2:
        out[1] = <uint8_t>size
    elif header == 4:
        out[1] = 126
        len16 = htons(<uint16_t>size)
        memcpy(out + 2, &len16, 2)
    else:
        out[1] = 127
        len64 = htobe64(<uint64_t>size)
        memcpy(out + 2, &len64, 8)
    memcpy(out + header, PyBytes_AS_STRING(payload), size)
    return frame


cdef str _room_of(object value):
    # An assessment id may arrive as a string or an integer; anything else
    # (null, bool, list, object, empty string) is no assessment at all.
    if type(value) is str:
        return <str>value if len(<str>value) else None
    if type(value) is int:
        return str(value)
    return None


# -- resume positions -----------------------------------------------------
#
# A partition is named by a 24-bit hash of its topic and its number, so the
# same record has the same key on every replica (no replica-local index). A
# position is the vector "last offset seen, per partition" of one assessment,
# with the time it was issued (for RESUME_MAX_AGE), as base64url varints:
# version byte, varint seconds, then (varint partition key, varint offset)
# pairs in key order.
#
# The live path keeps each vector in two small sorted C arrays and writes the
# token straight into the outgoing payload (one allocation, no Python objects
# in between): positions ride on every assessment message, so they must cost
# next to nothing. The dict-based functions below serve the cold paths
# (connected, snapshot, replays, parsing a client's token).

cdef dict _TOPIC_IDS = {}
cdef int _POS_VERSION = 1
cdef const char* _B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef enum:
    # Vectors up to this many partitions are encoded from the stack.
    _POS_STACK_PAIRS = 32


cdef inline int64_t _pkey(str topic, int partition):
    found = _TOPIC_IDS.get(topic)
    if found is None:
        found = zlib.crc32(topic.encode()) & 0xFFFFFF
        if len(_TOPIC_IDS) < 100_000:
            _TOPIC_IDS[topic] = found
    return (<int64_t>found << 20) | (partition & 0xFFFFF)


cdef inline Py_ssize_t _varint(uint8_t* out, uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 0
    while value >= 0x80:
        out[n] = <uint8_t>((value & 0x7F) | 0x80)
        value >>= 7
        n += 1
    out[n] = <uint8_t>value
    return n + 1


cdef Py_ssize_t _pos_raw(uint8_t* out, const int64_t* keys, const int64_t* offsets,
                         Py_ssize_t n, int64_t issued_s) noexcept nogil:
    # ``out`` holds at least 11 + 20 * n bytes.
    cdef Py_ssize_t at = 1, i
    out[0] = <uint8_t>_POS_VERSION
    at += _varint(out + at, <uint64_t>(issued_s if issued_s > 0 else 0))
    for i in range(n):
        at += _varint(out + at, <uint64_t>keys[i])
        at += _varint(out + at, <uint64_t>(offsets[i] if offsets[i] > 0 else 0))
    return at


cdef inline Py_ssize_t _b64url_len(Py_ssize_t size) noexcept nogil:
    # Unpadded: 4 characters per 3 bytes, 2 or 3 for a tail of 1 or 2.
    return (size * 4 + 2) // 3


cdef void _b64url(char* out, const uint8_t* raw, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t i = 0, o = 0
    cdef uint32_t v
    while i + 3 <= size:
        v = (<uint32_t>raw[i] << 16) | (<uint32_t>raw[i + 1] << 8) | raw[i + 2]
        out[o] = _B64URL[(v >> 18) & 63]
        out[o + 1] = _B64URL[(v >> 12) & 63]
        out[o + 2] = _B64URL[(v >> 6) & 63]
        out[o + 3] = _B64URL[v & 63]
        i += 3
        o += 4
    if size - i == 1:
        v = <uint32_t>raw[i] << 16
        out[o] = _B64URL[(v >> 18) & 63]
        out[o + 1] = _B64URL[(v >> 12) & 63]
    elif size - i == 2:
        v = (<uint32_t>raw[i] << 16) | (<uint32_t>raw[i + 1] << 8)
        out[o] = _B64URL[(v >> 18) & 63]
        out[o + 1] = _B64URL[(v >> 12) & 63]
        out[o + 2] = _B64URL[(v >> 6) & 63]


cdef bytes _splice_pos(bytes base, const int64_t* keys, const int64_t* offsets,
                       Py_ssize_t n, int64_t issued_s):
    # ``base`` (a JSON object) with ``,"pos":"<token>"`` as its last field:
    # positions always go last, so a message kept without one is positioned
    # again by splicing bytes instead of re-serializing.
    cdef uint8_t stack[11 + 20 * _POS_STACK_PAIRS]
    cdef uint8_t* raw = stack
    cdef Py_ssize_t size, encoded, head = PyBytes_GET_SIZE(base) - 1
    cdef bytes out
    cdef char* p
    if n > _POS_STACK_PAIRS:
        raw = <uint8_t*>PyMem_Malloc(11 + 20 * n)
        if raw == NULL:
            raise MemoryError()
    try:
        size = _pos_raw(raw, keys, offsets, n, issued_s)
        encoded = _b64url_len(size)
        out = PyBytes_FromStringAndSize(NULL, head + 8 + encoded + 2)
        p = PyBytes_AS_STRING(out)
        memcpy(p, PyBytes_AS_STRING(base), head)
        memcpy(p + head, b',"pos":"', 8)
        _b64url(p + head + 8, raw, size)
        p[head + 8 + encoded] = 34  # '"'
        p[head + 9 + encoded] = 125  # '}'
        return out
    finally:
        if raw != stack:
            PyMem_Free(raw)


cdef class _Vector:
    # A position vector from a dict, as the sorted arrays the encoder reads.
    cdef int64_t* keys
    cdef int64_t* offsets
    cdef Py_ssize_t n

    def __cinit__(self, dict vector):
        cdef Py_ssize_t i = 0
        self.n = len(vector)
        self.keys = <int64_t*>PyMem_Malloc((self.n + 1) * sizeof(int64_t))
        self.offsets = <int64_t*>PyMem_Malloc((self.n + 1) * sizeof(int64_t))
        if self.keys == NULL or self.offsets == NULL:
            raise MemoryError()
        for key in sorted(vector):
            self.keys[i] = <int64_t>key
            self.offsets[i] = <int64_t>vector[key]
            i += 1

    def __dealloc__(self):
        PyMem_Free(self.keys)
        PyMem_Free(self.offsets)


cdef bytes _with_pos(bytes base, dict vector, int64_t issued_s):
    cdef _Vector v = _Vector(vector)
    return _splice_pos(base, v.keys, v.offsets, v.n, issued_s)


cdef bytes _strip_pos(bytes payload):
    # A kept message without its pos (always the last field; a producer's
    # own "pos" is dropped when the message is built, and inside a JSON
    # string these bytes would have their quotes escaped).
    cdef Py_ssize_t at = payload.rfind(b',"pos":"')
    return payload if at < 0 else payload[:at] + b"}"


cpdef str encode_pos(dict vector, int64_t issued_s):
    """The opaque position token for ``vector`` (partition key -> offset)."""
    cdef bytes json = _with_pos(b"{}", vector, issued_s)
    # b'{,"pos":"TOKEN"}' -> TOKEN
    return PyUnicode_DecodeASCII(PyBytes_AS_STRING(json) + 9,
                                 PyBytes_GET_SIZE(json) - 11, NULL)


cpdef tuple decode_pos(str token):
    """``(issued_s, vector)`` of a position token.

    :raises ValueError: for anything that is not a token this router issued.
    """
    cdef bytes raw
    cdef Py_ssize_t i = 0, n
    cdef uint64_t value
    cdef int shift
    cdef list numbers = []
    if not token or len(token) > 4096:
        raise ValueError("empty or oversized position")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * ((4 - len(token) % 4) % 4))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError("position is not base64url") from None
    n = len(raw)
    if n < 2 or raw[0] != _POS_VERSION:
        raise ValueError("unknown position version")
    i = 1
    while i < n:
        value = 0
        shift = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated position")
            value |= <uint64_t>(raw[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not raw[i - 1] & 0x80:
                break
        numbers.append(value)
    if len(numbers) % 2 != 1:
        raise ValueError("malformed position")
    vector = {}
    for j in range(1, len(numbers), 2):
        vector[<int64_t>numbers[j]] = <int64_t>numbers[j + 1]
    return numbers[0], vector


cdef int _vec_set(_Vec* v, int64_t key, int64_t offset) except -1:
    # Sorted insert or update; an assessment spans a handful of partitions,
    # so a linear scan beats anything cleverer.
    cdef Py_ssize_t i = 0, cap
    cdef int64_t* keys
    cdef int64_t* offsets
    while i < v.len and v.keys[i] < key:
        i += 1
    if i < v.len and v.keys[i] == key:
        v.offsets[i] = offset
        return 0
    if v.len == v.cap:
        cap = 4 if v.cap == 0 else v.cap * 2
        keys = <int64_t*>PyMem_Realloc(v.keys, cap * sizeof(int64_t))
        if keys == NULL:
            raise MemoryError()
        v.keys = keys
        offsets = <int64_t*>PyMem_Realloc(v.offsets, cap * sizeof(int64_t))
        if offsets == NULL:
            raise MemoryError()
        v.offsets = offsets
        v.cap = cap
    memmove(v.keys + i + 1, v.keys + i, (v.len - i) * sizeof(int64_t))
    memmove(v.offsets + i + 1, v.offsets + i, (v.len - i) * sizeof(int64_t))
    v.keys[i] = key
    v.offsets[i] = offset
    v.len += 1
    return 0


cdef dict _vec_dict(const _Vec* v):
    cdef Py_ssize_t i
    return {v.keys[i]: v.offsets[i] for i in range(v.len)}


cdef void _vec_free(_Vec* v) noexcept:
    PyMem_Free(v.keys)
    PyMem_Free(v.offsets)
    v.keys = NULL
    v.offsets = NULL
    v.len = v.cap = 0


@cython.final
cdef class _AssessmentState:
    def __cinit__(self):
        self.rules = {}
        self.positions = {}
        self.kept_payloads = []

    def __dealloc__(self):
        _vec_free(&self.pos)
        _vec_free(&self.evicted)
        PyMem_Free(self.kept)

    cdef bytes positioned(self, bytes base, int64_t issued_s):
        return _splice_pos(base, self.pos.keys, self.pos.offsets, self.pos.len, issued_s)

    cdef dict vector(self):
        return _vec_dict(&self.pos)

    cdef dict evicted_upto(self):
        return _vec_dict(&self.evicted)

    cdef int keep(self, int64_t ts, int64_t pkey, int64_t offset, bytes payload,
                  double at, Py_ssize_t limit) except -1:
        # Append to the ring; the caller made room (kept_len < limit). The
        # ring grows by doubling up to ``limit``, so quiet assessments stay
        # small.
        cdef Py_ssize_t cap, i, slot
        cdef _Kept* grown
        cdef list payloads
        if self.kept_len == self.kept_cap:
            cap = min(max(4, self.kept_cap * 2), limit)
            grown = <_Kept*>PyMem_Malloc(cap * sizeof(_Kept))
            if grown == NULL:
                raise MemoryError()
            payloads = [None] * cap
            for i in range(self.kept_len):
                slot = (self.kept_head + i) % self.kept_cap
                grown[i] = self.kept[slot]
                payloads[i] = self.kept_payloads[slot]
            PyMem_Free(self.kept)
            self.kept = grown
            self.kept_payloads = payloads
            self.kept_cap = cap
            self.kept_head = 0
        slot = (self.kept_head + self.kept_len) % self.kept_cap
        self.kept[slot].ts = ts
        self.kept[slot].pkey = pkey
        self.kept[slot].offset = offset
        self.kept[slot].at = at
        self.kept_payloads[slot] = payload
        self.kept_len += 1
        return 0

    cdef Py_ssize_t drop_oldest(self) except -1:
        # Forget the oldest kept message; returns its size in bytes.
        cdef _Kept* oldest = &self.kept[self.kept_head]
        cdef bytes payload = <bytes>self.kept_payloads[self.kept_head]
        _vec_set(&self.evicted, oldest.pkey, oldest.offset)
        self.kept_payloads[self.kept_head] = None
        self.kept_head = (self.kept_head + 1) % self.kept_cap
        self.kept_len -= 1
        return PyBytes_GET_SIZE(payload)

    cdef list kept_items(self):
        # ``(ts_ms, pkey, offset, payload)``, oldest first.
        cdef Py_ssize_t i, slot
        cdef list out = []
        for i in range(self.kept_len):
            slot = (self.kept_head + i) % self.kept_cap
            out.append((self.kept[slot].ts, self.kept[slot].pkey,
                        self.kept[slot].offset, self.kept_payloads[slot]))
        return out


@cython.final
cdef class Connection(WSListener):
    """One client connection: a picows listener and its routing state.

    Data for the client is queued here during a batch (the first frame by
    reference, later ones copied into one buffer) and written with one send at
    the end of the batch, so a connection that gets N messages in a batch costs
    one system call, and one that gets a single message costs no copy at all.
    """

    def __cinit__(self, Router router not None, str user_id not None,
                  str assessment_id=None, str connection_id=None,
                  double expires_at=0.0, str since=None):
        self._router = router
        self.expires_at = expires_at
        self._since = since if since and assessment_id else None
        self.user_id = user_id
        self.assessment_id = assessment_id if assessment_id else None
        self.connection_id = connection_id if connection_id else str(_uuid4())
        self._index = -1
        self._room_index = -1
        self._recv_close_code = 0

    def __dealloc__(self):
        self._buf_release()

    cpdef on_ws_connected(self, WSTransport transport):
        cdef double now = _monotonic()
        self._transport = transport
        # picows keeps the parsed upgrade request and response (headers in
        # multidicts, a kilobyte or two) for the connection's lifetime; nothing
        # reads them after the handshake, and at 10k idle clients they would
        # be a fifth of the memory.
        transport.request = None
        transport.response = None
        cdef int sndbuf = self._router._sndbuf
        if sndbuf > 0:
            setsockopt(transport._socket, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(int))
        self.connected_at = now
        self.last_seen = now
        self._invalid_window_start = now
        self._router._register(self)
        cdef Router router = self._router
        cdef str refused = None
        router._check_live()
        if self._since is not None:
            plan = router._plan_resume(self)
            if type(plan) is str:
                refused = <str>plan
            else:
                vector, events, ranges = plan
                if ranges and router._on_readback is not None:
                    # Live frames wait until the read-back is written.
                    self._holding = True
                    router._on_readback(self, ranges, vector, events)
                    return
                if not ranges:
                    router.resumes_memory += 1
                    self._floor = vector
                    self._send_connected(True, vector)
                    self._write_frames(_replay(vector, events))
                    return
                refused = "the gap is no longer in memory"
        self._send_connected(False, None)
        if refused is not None:
            router.resumes_refused += 1
            self._send_now({"type": "resync_required", "reason": refused})
        self._send_raw(router._snapshot(self))

    def _send_connected(self, resumed, vector):
        message = {
            "type": "connected",
            "connectionId": self.connection_id,
            "userId": self.user_id,
            "timestamp": iso_utc(_epoch_ms()),
        }
        message["resumed"] = bool(resumed)
        if self.assessment_id is not None:
            message["assessmentId"] = self.assessment_id
            if vector is None:
                st = self._router._assessments.get(self.assessment_id)
                vector = {} if st is None else (<_AssessmentState>st).vector()
            message["pos"] = encode_pos(vector, _epoch_ms() // 1000)
        self._send_now(message)

    def _send_raw(self, bytes payload):
        cdef WSTransport t = self._transport
        if t is None or self._closing or t.is_close_frame_sent or t.is_disconnected:
            return
        t.send(WSMsgType.TEXT, payload)
        self._router.messages_sent += 1

    def finish_resume(self, list records, dict vector, list events, error=None):
        """Complete a resume that needed a read-back from Kafka.

        :param records: ``(topic, partition, offset, value, key, ts_ms)`` read
            back, in per-partition order; those of other assessments are skipped.
        :param error: why the read-back failed, if it did (the client then
            gets ``resync_required`` and the snapshot).
        """
        cdef Router router = self._router
        if not self._holding:
            return
        if error is not None:
            router.resumes_refused += 1
            self._send_connected(False, None)
            self._send_now({"type": "resync_required",
                            "reason": f"the gap could not be read back: {error}"})
            self._send_raw(router._snapshot(self))
        else:
            merged = list(events)
            for topic, partition, offset, value, key, ts_ms in records:
                if router._decode(value, topic, key, ts_ms, _pkey(topic, partition),
                                  offset, False) != DROP_NONE:
                    continue
                if router._ev_room != self.assessment_id:
                    continue
                merged.append((ts_ms, router._ev_pkey, offset, router._ev_payload))
            router._ev_payload = None
            merged = _merge_partitions(merged)
            router.resumes_kafka += 1
            self._floor = vector
            self._send_connected(True, vector)
            self._write_frames(_replay(vector, merged))
        self._holding = False
        self._drain_backlog()

    cdef int _write_frames(self, list payloads) except -1:
        # Replayed messages go out in one write, before anything live.
        cdef WSTransport t = self._transport
        if not payloads or t is None or t.is_disconnected or self._closing:
            return 0
        for payload in payloads:
            frame = make_frame(<bytes>payload)
            self._buf_append(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        self._write_buf(t)
        self._router.messages_sent += len(payloads)
        return 0

    cpdef on_ws_disconnected(self, WSTransport transport):
        cdef int code = 1006
        handshake = transport.close_handshake
        if handshake is not None and handshake.sent is not None:
            code = handshake.sent.code
        elif self._recv_close_code:
            code = self._recv_close_code
        self._router._unregister(self)
        self._pending = None
        self._buf_release()
        if self._paused:
            self._paused = False
            self._router.paused_connections -= 1
        self._backlog = None
        self._backlog_keys = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._router._count_close(code)
        if self._router._on_closed is not None:
            self._router._on_closed(self, code)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType kind = frame.msg_type
        self.last_seen = _monotonic()
        if self._closing and kind != WSMsgType.CLOSE:
            return  # what arrives after our close frame is no longer read
        if kind <= WSMsgType.BINARY:
            if self.last_seen - self._rate_window_start >= 1.0:
                self._rate_window_start = self.last_seen
                self._rate_count = 0
            self._rate_count += 1
            if self._rate_count > self._router._max_messages_per_s:
                self._router.rate_limit_closes += 1
                self.close(CLOSE_POLICY_VIOLATION, "too many messages")
                return
        if kind == WSMsgType.TEXT:
            self._router.messages_received += 1
            if not frame.fin:
                self._on_invalid(IGNORED_FRAGMENTED)
            else:
                self._on_text(frame)
        elif kind == WSMsgType.CLOSE:
            self._closing = True
            code = frame.get_close_code()
            self._recv_close_code = <int>code
            # Echo a valid code, as RFC 6455 section 5.5.1 asks; 1005 and
            # 1006 may never be sent on the wire.
            if code < 1000 or code in (1004, 1005, 1006) or code >= 5000:
                code = WSCloseCode.OK
            transport.send_close(code)
            if self._close_timer is not None:
                self._close_timer.cancel()
                self._close_timer = None
            transport.disconnect()
        elif kind == WSMsgType.BINARY:
            self._router.messages_received += 1
            self._on_invalid(IGNORED_BINARY)
        elif kind == WSMsgType.CONTINUATION:
            self._on_invalid(IGNORED_FRAGMENTED)
        # PING is answered by picows (enable_auto_pong); PONG only proves life.

    cdef int _on_text(self, WSFrame frame) except -1:
        # The memoryview points into picows' read buffer: orjson copies what it
        # keeps, and the view does not outlive this call.
        try:
            message = _loads(frame.get_payload_as_memoryview())
        except _JSONDecodeError:
            return self._on_invalid(IGNORED_INVALID_JSON)
        if type(message) is not dict:
            return self._on_invalid(IGNORED_NOT_OBJECT)
        kind = (<dict>message).get("type")
        if kind == "pong":
            return 0
        if kind == "ping":
            return self._send_now({"type": "pong", "timestamp": _epoch_ms()})
        if kind == "refresh":
            return self._on_refresh(<dict>message)
        return self._on_invalid(IGNORED_UNKNOWN_TYPE)

    cdef int _on_refresh(self, dict message) except -1:
        # A fresh token extends the connection past the old token's exp. It
        # must verify like the first one and speak for the same user (and
        # still allow this assessment); a refused refresh leaves the old
        # expiry in force.
        verify = self._router._token_verifier
        token = message.get("token")
        reason = None
        if verify is None:
            reason = "refresh is not supported"
        elif type(token) is not str:
            reason = "missing token"
        else:
            try:
                identity = verify(token)
            except Exception as exc:
                reason = getattr(exc, "reason", None) or "invalid token"
            else:
                allowed = identity.claims.get("assessments")
                if identity.user_id != self.user_id:
                    reason = "token is for another user"
                elif allowed is not None and not isinstance(allowed, list):
                    reason = "the assessments claim must be a list"
                elif allowed is None and self._router._require_assessment_claim:
                    reason = "token has no assessments claim"
                elif (self.assessment_id is not None and allowed is not None
                      and self.assessment_id not in allowed):
                    reason = "token does not allow this assessment"
                else:
                    self.expires_at = identity.expires_at or 0.0
                    self._router.refreshes += 1
                    reply = {"type": "refreshed", "timestamp": iso_utc(_epoch_ms())}
                    if self.expires_at:
                        reply["expiresAt"] = iso_utc(<int64_t>(self.expires_at * 1000))
                    return self._send_now(reply)
        return self._send_now({"type": "refresh_failed", "reason": reason,
                               "timestamp": iso_utc(_epoch_ms())})

    cpdef pause_writing(self):
        """picows: the transport's buffer crossed its high watermark."""
        if not self._paused:
            self._paused = True
            self._router.paused_connections += 1

    cpdef resume_writing(self):
        """picows: the transport drained below its low watermark."""
        if self._paused:
            self._paused = False
            self._router.paused_connections -= 1
            if not self._holding:
                self._drain_backlog()

    cdef int _on_invalid(self, int reason) except -1:
        cdef double now = self.last_seen
        self._router._ignored[reason] += 1
        if now - self._invalid_window_start > _INVALID_WINDOW_S:
            self._invalid_window_start = now
            self._invalid_frames = 0
        self._invalid_frames += 1
        if self._invalid_frames > self._router._max_invalid_frames:
            self.close(CLOSE_POLICY_VIOLATION, "too many invalid frames")
        return 0

    cdef int _send_now(self, object message) except -1:
        cdef WSTransport t = self._transport
        if t is None or self._closing or t.is_close_frame_sent or t.is_disconnected:
            return 0
        t.send(WSMsgType.TEXT, _dumps(message))
        self._router.messages_sent += 1
        return 0

    cpdef close(self, int code, str reason):
        """Send a close frame with ``code`` and ``reason``, then disconnect."""
        cdef WSTransport t = self._transport
        if self._closing or t is None or t.is_disconnected:
            return
        self._closing = True
        self._pending = None
        self._buf_len = 0
        try:
            t.send_close(<WSCloseCode>code, reason.encode())
        except Exception:
            t.disconnect()
            raise
        # RFC 6455 7.1.1: the TCP connection is closed after the client's
        # close frame arrives (see on_ws_frame), or after a grace period.
        # Closing at once would answer a client that is still writing with
        # a reset, which can destroy the close frame before it is read.
        self._close_timer = t._loop.call_later(_CLOSE_GRACE_S, self._finish_close)

    def _finish_close(self):
        # Graceful close flushes what is queued (the close frame included);
        # a client that never reads would hold that forever, so it is cut
        # off after a further grace.
        cdef WSTransport t = self._transport
        self._close_timer = None
        if t.is_disconnected:
            return
        t.disconnect(True)
        self._close_timer = t._loop.call_later(_ABORT_GRACE_S, self._abort)

    def _abort(self):
        cdef WSTransport t = self._transport
        self._close_timer = None
        if not t.is_disconnected:
            t.disconnect(False)

    cdef inline int _enqueue(self, bytes frame, str ckey) except -1:
        if self._closing:
            return 0
        if self._paused or self._holding:
            return self._defer(frame, None if self._holding else ckey)
        self._queued += 1
        if self._buf_len:
            return self._buf_append(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        if self._pending is None:
            self._pending = frame
            self._router._dirty.append(self)
            return 0
        # A second frame in this batch: from here on they share one buffer.
        self._buf_append(PyBytes_AS_STRING(self._pending),
                         PyBytes_GET_SIZE(self._pending))
        self._pending = None
        return self._buf_append(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))

    cdef int _defer(self, bytes frame, str ckey) except -1:
        # The client is behind. State-like messages (the latest price of a
        # market, the latest P&L, the latest status of a rule) replace their
        # older copy, which is worthless now; events (violations, positions,
        # assessment status) queue in order and are never dropped silently:
        # past the hard limit the client is closed with 1013 instead.
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        cdef Py_ssize_t index
        if self._backlog is None:
            self._backlog = []
            self._backlog_keys = {}
        if ckey is not None:
            found = self._backlog_keys.get(ckey)
            if found is not None:
                index = <Py_ssize_t>found
                self._backlog_bytes -= PyBytes_GET_SIZE(<bytes>self._backlog[index])
                self._backlog[index] = None
                self._router.conflated += 1
            self._backlog_keys[ckey] = len(self._backlog)
        self._backlog.append(frame)
        self._backlog_bytes += size
        cdef Py_ssize_t queued = self._backlog_bytes + <Py_ssize_t>(
            self._transport.underlying_transport.get_write_buffer_size())
        if queued > self._router._max_buffer_bytes:
            self._router.slow_client_closes += 1
            self._backlog = None
            self._backlog_keys = None
            self._backlog_bytes = 0
            self.close(CLOSE_TRY_AGAIN_LATER, "client too slow: outbound buffer over limit")
        return 0

    cdef int _drain_backlog(self) except -1:
        cdef list backlog = self._backlog
        cdef Py_ssize_t sent = 0
        cdef WSTransport t = self._transport
        self._backlog = None
        self._backlog_keys = None
        self._backlog_bytes = 0
        if not backlog or self._closing or t.is_close_frame_sent or t.is_disconnected:
            return 0
        for frame in backlog:
            if frame is not None:
                self._buf_append(PyBytes_AS_STRING(<bytes>frame),
                                 PyBytes_GET_SIZE(<bytes>frame))
                sent += 1
        if self._buf_len:
            self._write_buf(t)
        self._router.messages_sent += sent
        return 0

    cdef int _buf_append(self, const char* data, Py_ssize_t size) except -1:
        cdef Py_ssize_t need = self._buf_len + size
        cdef Py_ssize_t cap
        cdef char* grown
        if need > self._buf_cap:
            cap = self._buf_cap * 2 if self._buf_cap else 1024
            while cap < need:
                cap *= 2
            grown = <char*>PyMem_Realloc(self._buf, cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._buf_cap = cap
        memcpy(self._buf + self._buf_len, data, size)
        self._buf_len = need
        return 0

    cdef int _write_buf(self, WSTransport t) except -1:
        # One send for everything coalesced; a buffer that grew large is given
        # back rather than kept for the next batch.
        try:
            t._fast_write(self._buf, self._buf_len)
        finally:
            self._buf_len = 0
        if self._buf_cap > _KEEP_BUF_BYTES:
            self._buf_release()
        return 0

    cdef void _buf_release(self) noexcept:
        if self._buf != NULL:
            PyMem_Free(self._buf)
            self._buf = NULL
        self._buf_len = 0
        self._buf_cap = 0

    cdef int _flush(self) except -1:
        cdef WSTransport t = self._transport
        cdef Py_ssize_t queued = self._queued
        cdef bytes pending = self._pending
        self._queued = 0
        self._pending = None
        if self._closing or t.is_close_frame_sent or t.is_disconnected:
            self._buf_len = 0
            return 0
        if self._buf_len:
            self._buf_used = True
            self._write_buf(t)
        elif pending is not None:
            t._fast_write(PyBytes_AS_STRING(pending), PyBytes_GET_SIZE(pending))
        self._router.messages_sent += queued
        return 0


def _time_then_partition(item):
    return (item[0], item[1])


cdef object _TIME_KEY_OFFSET = operator.itemgetter(0, 1, 2)


cdef list _merge_partitions(list items):
    # Items are (ts_ms, pkey, offset, ...), each partition's in offset order.
    # The result keeps every partition's order and puts the earlier record
    # time first across partitions (ties by partition key): one interleaving
    # that every replica gives the same records, and with it the same
    # positions. When each partition's times rise with its offsets (the
    # usual case) that is a sort by (time, key, offset); otherwise a k-way
    # merge of the partitions.
    cdef dict last = {}
    cdef bint monotone = True
    for item in items:
        pkey = (<tuple>item)[1]
        previous = last.get(pkey)
        if previous is not None and previous > (<tuple>item)[0]:
            monotone = False
            break
        last[pkey] = (<tuple>item)[0]
    if monotone:
        return items if len(last) <= 1 else sorted(items, key=_TIME_KEY_OFFSET)
    groups = {}
    for item in items:
        found = groups.get((<tuple>item)[1])
        if found is None:
            groups[(<tuple>item)[1]] = [item]
        else:
            (<list>found).append(item)
    return list(heapq.merge(*groups.values(), key=_time_then_partition))


cdef int _record_order(const void* a, const void* b) noexcept nogil:
    cdef const _Record* x = <const _Record*>a
    cdef const _Record* y = <const _Record*>b
    if x.ts != y.ts:
        return -1 if x.ts < y.ts else 1
    if x.pkey != y.pkey:
        return -1 if x.pkey < y.pkey else 1
    if x.offset != y.offset:
        return -1 if x.offset < y.offset else 1
    return 0


cdef list _replay(dict vector, list events):
    # Each replayed message carries the client's vector advanced by the
    # messages replayed so far: monotone, and exact whenever it stops.
    # Each is issued at its record's time, as the live message was.
    cdef dict running = dict(vector)
    cdef list out = []
    for ts_ms, pkey, offset, payload in events:
        running[pkey] = offset
        out.append(_with_pos(_strip_pos(<bytes>payload), running,
                             <int64_t>ts_ms // 1000 if ts_ms > 0 else 0))
    return out


@cython.final
cdef class Router:
    """Who is connected, in which room (assessment), and what each batch owes them.

    :param heartbeat_interval_ms: period of the JSON ping round, milliseconds.
    :param connection_timeout_ms: silence after which a connection is closed
        with 4000, milliseconds.
    :param max_invalid_frames: invalid client frames tolerated per 10 s before
        the connection is closed with 1008.
    :param max_messages_per_s: inbound frames per second per client before a
        1008 close.
    :param max_buffer_bytes: outbound bytes a slow client may have queued
        (transport buffer plus backlog) before a 1013 close.
    :param socket_send_buffer: ``SO_SNDBUF`` for client sockets, bytes; 0
        leaves the kernel's autotuning.
    :param require_assessment_claim: a refresh token must carry an
        ``assessments`` claim (as at the handshake).
    :param resume_buffer_size: assessment messages kept per assessment for
        resume.
    :param resume_buffer_max_bytes: all resume buffers together, bytes.
    :param resume_max_age_ms: oldest position a client may resume from.
    :param state_max_assessments: assessments whose latest state is kept for
        the snapshot on connect.
    :param resume: keep positions, resume buffers and snapshot state (on in the
        service; off only to measure what they cost, side by side).
    :param token_verifier: ``verify(token) -> Identity`` for ``refresh``
        messages; raises on a bad token.
    :param on_closed: called as ``on_closed(connection, close_code)`` after a
        connection is gone (metrics use it for the duration histogram).
    """

    def __cinit__(self, *, double heartbeat_interval_ms=30000,
                  double connection_timeout_ms=60000, int max_invalid_frames=20,
                  int max_messages_per_s=50, Py_ssize_t max_buffer_bytes=1048576,
                  int socket_send_buffer=0, bint require_assessment_claim=False,
                  int resume_buffer_size=256,
                  Py_ssize_t resume_buffer_max_bytes=64 * 1024 * 1024,
                  double resume_max_age_ms=300000, Py_ssize_t state_max_assessments=100000,
                  bint resume=True, object token_verifier=None, object on_closed=None):
        self._rooms = {}
        self._conns = []
        self._dirty = []
        self._spare = []
        self._logger = _logger
        self._log_debug = _logger.isEnabledFor(logging.DEBUG)
        self._on_closed = on_closed
        self._heartbeat_interval_s = heartbeat_interval_ms / 1000.0
        self._connection_timeout_s = connection_timeout_ms / 1000.0
        self._max_invalid_frames = max_invalid_frames
        self._max_messages_per_s = max_messages_per_s
        self._max_buffer_bytes = max_buffer_bytes
        self._sndbuf = socket_send_buffer
        self._require_assessment_claim = require_assessment_claim
        self._token_verifier = token_verifier
        self._live = True
        self._warm = []
        self._assessments = collections.OrderedDict()
        self._prices = {}
        self._positions = {}
        self._pkey_topics = {}
        self._first_offsets = {}
        self._buffer_events = resume_buffer_size
        self._buffer_max_bytes = resume_buffer_max_bytes
        self._resume_max_age_s = resume_max_age_ms / 1000.0
        self._state_max = state_max_assessments
        self._track = resume
        self._next_ping = _monotonic() + self._heartbeat_interval_s
        self._closed_by_code = {}
        self._loop_thread = PyThread_get_thread_ident()

    @property
    def on_closed(self):
        """``on_closed(connection, close_code)``, called after a connection is gone."""
        return self._on_closed

    @on_closed.setter
    def on_closed(self, callback):
        self._on_closed = callback

    @property
    def live_check(self):
        """While set and false, records are history (a warm-up read-back):
        they build state and resume buffers but are pushed to nobody. The
        first batch for which it returns true makes the router live for good."""
        return self._live_check

    @live_check.setter
    def live_check(self, check):
        self._live_check = check
        self._live = check is None
        self._warm = []

    @property
    def on_readback(self):
        """``on_readback(connection, ranges, vector, events)``: read the
        ``(topic, partition, start, end)`` ranges back from Kafka, then call
        ``connection.finish_resume(records, vector, events, error)``."""
        return self._on_readback

    @on_readback.setter
    def on_readback(self, callback):
        self._on_readback = callback

    @property
    def token_verifier(self):
        """``verify(token) -> Identity`` used for ``refresh`` messages."""
        return self._token_verifier

    @token_verifier.setter
    def token_verifier(self, verify):
        self._token_verifier = verify

    # -- registry ---------------------------------------------------------

    @property
    def connection_count(self):
        return len(self._conns)

    @property
    def room_count(self):
        return len(self._rooms)

    def connections(self):
        """A snapshot list of the open connections."""
        return list(self._conns)

    def room_size(self, str assessment_id):
        room = self._rooms.get(assessment_id)
        return 0 if room is None else len(<list>room)

    cdef int _register(self, Connection conn) except -1:
        cdef list room
        if conn._index >= 0:
            return 0
        conn._index = len(self._conns)
        self._conns.append(conn)
        if conn.assessment_id is not None:
            room = self._rooms.get(conn.assessment_id)
            if room is None:
                room = []
                self._rooms[conn.assessment_id] = room
            conn._room_index = len(room)
            room.append(conn)
        return 0

    cdef int _unregister(self, Connection conn) except -1:
        # Swap-remove keeps both lists dense, so removal is O(1) and fan-out
        # iterates plain lists.
        cdef Connection last
        cdef list room
        if conn._index < 0:
            return 0
        last = <Connection>self._conns[len(self._conns) - 1]
        self._conns[conn._index] = last
        last._index = conn._index
        self._conns.pop()
        conn._index = -1
        if conn._room_index >= 0:
            room = <list>self._rooms[conn.assessment_id]
            last = <Connection>room[len(room) - 1]
            room[conn._room_index] = last
            last._room_index = conn._room_index
            room.pop()
            conn._room_index = -1
            if not room:
                del self._rooms[conn.assessment_id]
        return 0

    # -- Kafka records in -----------------------------------------------------

    cpdef deliver(self, list batch):
        """Route one batch of confluent-kafka messages and flush every write.

        Each record is decoded, normalized, serialized and framed once; each
        connection then gets one write for the whole batch. Records of
        different partitions are routed in record-time order (see
        ``_merge_partitions``), each partition's in offset order.
        """
        if PUSHSVC_DEBUG:
            assert PyThread_get_thread_ident() == self._loop_thread, \
                "Router.deliver called off the loop thread"
        cdef int reason
        cdef Py_ssize_t count = 0, i
        cdef _Record* records
        cdef _Record* r
        cdef int64_t ts_ms, pkey, offset, run_pkey = -1, run_offset = -1, run_ts = 0
        cdef bint ordered = True, monotone = True
        cdef list messages = []
        cdef list topics = []
        cdef dict run_ends = None
        self.batches += 1
        self._check_live()
        self._now = _monotonic()
        records = <_Record*>PyMem_Malloc((len(batch) + 1) * sizeof(_Record))
        if records == NULL:
            raise MemoryError()
        try:
            # Pass 1: what each record is, without touching its value. A
            # batch arrives in runs of one partition; per-partition state is
            # updated once per run.
            for msg in batch:
                err = msg.error()
                if err is not None:
                    self._count_drop(DROP_KAFKA_ERROR, msg.topic(), err)
                    continue
                ts = msg.timestamp()
                topic = msg.topic()
                offset = msg.offset()
                ts_ms = (<tuple>ts)[1] if (<tuple>ts)[0] else _epoch_ms()
                pkey = _pkey(topic, msg.partition())
                if pkey != run_pkey:
                    if run_pkey >= 0:
                        self._positions[run_pkey] = run_offset + 1
                        if run_ends is None:
                            run_ends = {}
                        run_ends[run_pkey] = run_ts
                        previous = run_ends.get(pkey)
                        if previous is not None and <int64_t>previous > ts_ms:
                            monotone = False
                    if pkey not in self._first_offsets:
                        self._first_offsets[pkey] = offset
                        self._pkey_topics[pkey] = (topic, msg.partition())
                    run_pkey = pkey
                elif ts_ms < run_ts:
                    monotone = False
                run_offset = offset
                run_ts = ts_ms
                r = &records[count]
                r.ts = ts_ms
                r.pkey = pkey
                r.offset = offset
                r.index = count
                if count and ordered and _record_order(r - 1, r) > 0:
                    ordered = False
                messages.append(msg)
                topics.append(topic)
                count += 1
            if run_pkey >= 0:
                self._positions[run_pkey] = run_offset + 1
            if not ordered:
                if monotone:
                    qsort(records, count, sizeof(_Record), _record_order)
                else:
                    self._merge_records(records, count)
            # Pass 2: decode, position and route, in that order.
            for i in range(count):
                r = &records[i]
                msg = messages[r.index]
                topic = topics[r.index]
                if not self._live:
                    # History read back at start: kept, then replayed in
                    # record-time order, so positions come out as a live
                    # replica computed them, not in per-partition chunks.
                    self._warm.append((r.ts, r.pkey, r.offset, topic, msg.partition(),
                                       msg.value(), msg.key()))
                    if len(self._warm) >= 500_000:
                        self._process_warm()
                    continue
                reason = self._decode(msg.value(), <str>topic, msg.key(), r.ts,
                                      r.pkey, r.offset, True)
                self.kafka_processed += 1
                if reason != DROP_NONE:
                    self._count_drop(reason, topic, msg.value())
                    continue
                self._fan_out()
        finally:
            PyMem_Free(records)
            self._ev_payload = None
            self._flush()

    cdef int _merge_records(self, _Record* records, Py_ssize_t count) except -1:
        # Some partition's record times go backwards: a k-way merge by
        # partition keeps every partition's own order.
        cdef Py_ssize_t i
        cdef list items = [(records[i].ts, records[i].pkey, records[i].offset,
                            records[i].index) for i in range(count)]
        for i, item in enumerate(_merge_partitions(items)):
            records[i].ts = (<tuple>item)[0]
            records[i].pkey = (<tuple>item)[1]
            records[i].offset = (<tuple>item)[2]
            records[i].index = (<tuple>item)[3]
        return 0

    def route(self, object value, str topic, object key=None, object timestamp_ms=None):
        """Route one record given as its parts; returns the drop reason or None.

        The same path as :meth:`deliver`, for tests and benchmarks without a
        broker.
        """
        cdef int reason = self._decode(
            value, topic, key,
            _epoch_ms() if timestamp_ms is None else <int64_t>timestamp_ms)
        self.kafka_processed += 1
        try:
            if reason != DROP_NONE:
                self._count_drop(reason, topic, value)
                return _DROP_REASONS[reason]
            self._fan_out()
        finally:
            self._ev_payload = None
            self._flush()
        return None

    def normalize(self, object value, str topic, object key=None,
                  object timestamp_ms=0):
        """Decode and normalize one record without routing it.

        :return: ``(type, assessment_id or None, payload bytes)``
        :raises ValueError: with the drop reason as its message.
        """
        cdef int reason = self._decode(value, topic, key, <int64_t>timestamp_ms,
                                       -1, -1, False)
        if reason != DROP_NONE:
            raise ValueError(_DROP_REASONS[reason])
        payload = self._ev_payload
        self._ev_payload = None
        return _KIND_NAMES[self._ev_kind], self._ev_room, payload

    cdef int _decode(self, object raw, str topic, object key, int64_t ts_ms,
                     int64_t pkey=-1, int64_t offset=-1, bint track=True) except -1:
        cdef dict event
        cdef dict out
        cdef int kind
        cdef str room = None
        if raw is None:
            # A null value (a tombstone) is not JSON either.
            return DROP_INVALID_JSON
        try:
            value = _loads(raw)
        except _JSONDecodeError:
            return DROP_INVALID_JSON
        if type(value) is not dict:
            return DROP_NOT_OBJECT
        event = <dict>value
        declared = event.get("type")
        if declared is None:
            found = _TOPIC_KINDS.get(topic)
        elif type(declared) is str:
            found = _TYPE_KINDS.get(declared)
        else:
            found = None
        if found is None:
            return DROP_UNKNOWN_TYPE
        kind = <int>found
        out = {"type": _KIND_NAMES[kind]}
        for name, field in event.items():
            if name != "type":
                out[camel(<str>name)] = field
        if kind != KIND_MARKET_PRICE:
            room = _room_of(event.get("assessmentId"))
            if room is None:
                room = _room_of(event.get("assessment_id"))
            if room is None and key is not None:
                try:
                    room = _room_of((<bytes>key).decode("utf-8")
                                    if type(key) is bytes else key)
                except UnicodeDecodeError:
                    room = None
            if room is None:
                return DROP_MISSING_ASSESSMENT
            if "assessmentId" not in out or _room_of(out["assessmentId"]) is None:
                out["assessmentId"] = room
            if "pos" in out:
                # Reserved for the resume position, which the router adds.
                del out["pos"]
        if "timestamp" not in out:
            out["timestamp"] = iso_utc(ts_ms)
        # Conflation key for clients that are behind: only the newest of
        # these is worth sending (a connection has one assessment, so its P&L
        # needs no further key).
        if kind == KIND_MARKET_PRICE:
            self._ev_ckey = "m:" + str(event.get("market"))
        elif kind == KIND_PNL_UPDATE:
            self._ev_ckey = "p"
        elif kind == KIND_RULE_STATUS:
            self._ev_ckey = "r:" + str(event.get("rule"))
        else:
            self._ev_ckey = None
        self._ev_kind = kind
        self._ev_room = room
        self._ev_offset = offset
        self._ev_pkey = pkey if offset >= 0 else -1
        cdef bytes base = _dumps(out)
        cdef _AssessmentState st
        self._ev_payload = base
        if track and self._track and offset >= 0:
            if room is not None:
                # The position is the assessment's vector after this record,
                # spliced in as the payload's last field.
                st = self._state(room)
                _vec_set(&st.pos, pkey, offset)
                self._ev_payload = st.positioned(base, ts_ms // 1000 if ts_ms > 0 else 0)
                self._remember(st, event, ts_ms)
            elif kind == KIND_MARKET_PRICE:
                market = str(event.get("market"))
                if market in self._prices or len(self._prices) < 10_000:
                    self._prices[market] = base
        return DROP_NONE

    cdef _AssessmentState _state(self, str room):
        # Eviction is approximately least recently updated: assessments sit in
        # insertion order, each update only stamps a tick, and the oldest
        # entry gets a second chance (moves to the end) if it was updated
        # lately. That keeps the per-record cost at one lookup.
        cdef _AssessmentState st
        cdef PyObject* found = PyDict_GetItem(self._assessments, room)
        if found != NULL:
            st = <_AssessmentState>found
        else:
            if len(self._assessments) >= self._state_max:
                self._evict_state()
            st = _AssessmentState()
            self._assessments[room] = st
        self._tick += 1
        st.touched = self._tick
        return st

    cdef int _evict_state(self) except -1:
        cdef _AssessmentState gone
        cdef uint64_t recent = <uint64_t>(len(self._assessments) // 2)
        cdef int attempt
        for attempt in range(64):
            oldest, found = self._assessments.popitem(last=False)
            gone = <_AssessmentState>found
            if self._tick - gone.touched < recent and attempt < 63:
                self._assessments[oldest] = gone
                continue
            self.buffer_bytes -= gone.nbytes
            self.buffer_entries -= gone.kept_len
            self.state_evictions += 1
            return 0
        return 0

    cdef int _remember(self, _AssessmentState st, dict event, int64_t ts_ms) except -1:
        # Kept as sent, pos and all: the bytes orjson wrote are then freed
        # at once, while they are still in cache, and what stays is a small
        # exact-size object. The snapshot strips the pos (it holds state, not
        # positions); a replay positions each message for its client.
        cdef bytes payload = self._ev_payload
        cdef int kind = self._ev_kind
        if kind == KIND_PNL_UPDATE:
            st.pnl = payload
        elif kind == KIND_RULE_STATUS:
            st.rules[str(event.get("rule"))] = payload
        elif kind == KIND_ASSESSMENT_UPDATE:
            st.status = payload
        elif kind == KIND_POSITION_UPDATE:
            pid = event.get("positionId", event.get("position_id"))
            if pid is not None:
                qty = event.get("quantity")
                if qty == 0 or qty == "0" or qty == "0.0":
                    st.positions.pop(str(pid), None)
                else:
                    st.positions[str(pid)] = payload
        if self._buffer_events > 0:
            if st.kept_len >= self._buffer_events:
                self._evict_oldest(st)
            st.keep(ts_ms, self._ev_pkey, self._ev_offset, payload, self._now,
                    self._buffer_events)
            st.nbytes += PyBytes_GET_SIZE(payload)
            self.buffer_bytes += PyBytes_GET_SIZE(payload)
            self.buffer_entries += 1
            self._trim(st, self._now)
        return 0

    cdef int _trim(self, _AssessmentState st, double now) except -1:
        while st.kept_len and now - st.kept[st.kept_head].at > self._resume_max_age_s:
            self._evict_oldest(st)
        if self.buffer_bytes > self._buffer_max_bytes:
            # Over the global cap: the least recently active assessments give
            # up their oldest messages first.
            for other in self._assessments.values():
                while (<_AssessmentState>other).kept_len and \
                        self.buffer_bytes > self._buffer_max_bytes:
                    self._evict_oldest(<_AssessmentState>other)
                if self.buffer_bytes <= self._buffer_max_bytes:
                    break
        return 0

    cdef int _evict_oldest(self, _AssessmentState st) except -1:
        cdef Py_ssize_t size = st.drop_oldest()
        st.nbytes -= size
        self.buffer_bytes -= size
        self.buffer_entries -= 1
        self.buffer_evictions += 1
        return 0

    cdef bytes _snapshot(self, Connection conn):
        """The ``snapshot`` message for ``conn``: latest price per market and,
        for its assessment, P&L, rules, status and open positions."""
        cdef list parts = [
            b'{"type":"snapshot","timestamp":"',
            iso_utc(_epoch_ms()).encode("ascii"),
            b'","marketPrices":[',
            b",".join(self._prices.values()),
            b"]",
        ]
        cdef _AssessmentState st = None
        if conn.assessment_id is not None:
            found = self._assessments.get(conn.assessment_id)
            if found is not None:
                st = <_AssessmentState>found
        if st is None:
            parts.append(b',"pnl":null,"rules":[],"assessment":null,"positions":[]')
        else:
            parts += [
                b',"pnl":', _strip_pos(st.pnl) if st.pnl is not None else b"null",
                b',"rules":[', b",".join([_strip_pos(p) for p in st.rules.values()]),
                b'],"assessment":',
                _strip_pos(st.status) if st.status is not None else b"null",
                b',"positions":[',
                b",".join([_strip_pos(p) for p in st.positions.values()]), b"]",
            ]
        if conn.assessment_id is not None:
            vector = {} if st is None else st.vector()
            parts += [b',"pos":"', encode_pos(vector, _epoch_ms() // 1000).encode(), b'"']
        parts.append(b"}")
        return b"".join(parts)

    cdef object _plan_resume(self, Connection conn):
        # A refusal reason (str), or (vector, memory events, Kafka ranges).
        try:
            issued, vector = decode_pos(conn._since)
        except ValueError as exc:
            return f"malformed position: {exc}"
        if _epoch_ms() / 1000.0 - issued > self._resume_max_age_s:
            return "position older than RESUME_MAX_AGE"
        found = self._assessments.get(conn.assessment_id)
        cdef _AssessmentState st = <_AssessmentState>found if found is not None else None
        cdef set from_kafka = set()
        cdef list events = []
        cdef list ranges = []
        if st is not None:
            for pkey, upto in st.evicted_upto().items():
                if upto > vector.get(pkey, -1):
                    from_kafka.add(pkey)
        for pkey, seen in vector.items():
            first = self._first_offsets.get(pkey)
            if first is not None and seen + 1 < first:
                from_kafka.add(pkey)  # from before this replica started reading
        if st is not None:
            for item in st.kept_items():
                pkey = (<tuple>item)[1]
                if pkey in from_kafka:
                    continue
                if (<tuple>item)[2] > vector.get(pkey, -1):
                    events.append(((<tuple>item)[0], pkey, (<tuple>item)[2],
                                   (<tuple>item)[3]))
        for pkey in from_kafka:
            where = self._pkey_topics.get(pkey)
            if where is None:
                continue
            start = vector.get(pkey, -1) + 1
            end = self._positions.get(pkey, start)
            if end > start:
                ranges.append((where[0], where[1], start, end))
        return vector, events, ranges

    cdef int _check_live(self) except -1:
        if not self._live and (self._live_check is None or self._live_check()):
            self._process_warm()
            self._live = True
        return 0

    cdef int _process_warm(self) except -1:
        cdef list warm = self._warm
        cdef int reason
        self._warm = []
        self._now = _monotonic()
        for ts_ms, pkey, offset, topic, partition, value, key in _merge_partitions(warm):
            reason = self._decode(value, topic, key, ts_ms, pkey, offset, True)
            self.kafka_processed += 1
            if reason != DROP_NONE:
                self._count_drop(reason, topic, value)
        self._ev_payload = None
        return 0

    cdef int _fan_out(self) except -1:
        cdef bytes frame
        cdef list targets
        if self._ev_kind == KIND_MARKET_PRICE:
            targets = self._conns
        else:
            found = self._rooms.get(self._ev_room)
            if found is None:
                return 0
            targets = <list>found
        if not targets:
            return 0
        frame = make_frame(self._ev_payload)
        ckey = self._ev_ckey
        cdef Connection target
        for conn in targets:
            target = <Connection>conn
            if target._floor is not None and self._ev_pkey >= 0 and \
                    self._ev_offset <= target._floor.get(self._ev_pkey, -1):
                continue  # resumed past this on another replica
            target._enqueue(frame, ckey)
        return 0

    cdef int _flush(self) except -1:
        cdef list dirty = self._dirty
        cdef Connection conn
        if not dirty:
            return 0
        # Swap in the spare list first: nothing queued during the writes below
        # can land in the list being drained.
        self._dirty = self._spare
        self._spare = dirty
        for item in dirty:
            conn = <Connection>item
            try:
                conn._flush()
            except Exception:
                # One broken socket must not cost the others their messages.
                self._logger.exception("write to connection %s failed",
                                       conn.connection_id)
                conn.close(1011, "internal error")
        dirty.clear()
        return 0

    cdef int _count_drop(self, int reason, object topic, object raw) except -1:
        cdef double now
        self._dropped[reason] += 1
        self._drops_since_log += 1
        now = _monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            sample = raw[:120] if isinstance(raw, (bytes, str)) else raw
            self._logger.warning(
                "dropped kafka record from topic %s: %s (%d dropped since the "
                "last report); sample: %r", topic, _DROP_REASONS[reason],
                self._drops_since_log, sample)
            self._drops_since_log = 0
        return 0

    cdef int _count_close(self, int code) except -1:
        self._closed_by_code[code] = self._closed_by_code.get(code, 0) + 1
        return 0

    # -- heartbeat --------------------------------------------------------

    cpdef sweep(self):
        """One pass of the heartbeat: ping round when due, close the silent.

        Called periodically by the server; there is no timer per connection.
        """
        cdef double now = _monotonic()
        cdef double wall = _epoch_s()
        cdef bint ping = now >= self._next_ping
        self._check_live()
        cdef bytes frame = None
        cdef Connection conn
        if ping:
            self._next_ping = now + self._heartbeat_interval_s
            frame = make_frame(_dumps({"type": "ping", "timestamp": _epoch_ms()}))
        for item in list(self._conns):
            conn = <Connection>item
            if now - conn.last_seen > self._connection_timeout_s:
                self.heartbeat_failures += 1
                conn.close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                continue
            if conn.expires_at and wall >= conn.expires_at:
                self.token_expiry_closes += 1
                conn.close(CLOSE_TOKEN_EXPIRED,
                           "token expired: reconnect with a new token")
                continue
            if ping:
                conn._enqueue(frame, "ping")
            if not conn._buf_used and conn._buf != NULL and conn._buf_len == 0:
                # Idle connections give their coalescing buffer back.
                conn._buf_release()
            conn._buf_used = False
        self._flush()

    def close_all(self, int code, str reason):
        """Close every connection with ``code`` and ``reason``."""
        for conn in list(self._conns):
            (<Connection>conn).close(code, reason)

    # -- counters, read at scrape time -----------------------------------

    def stats(self):
        """Every counter as plain Python values (read by the metrics module)."""
        return {
            "connections": len(self._conns),
            "rooms": len(self._rooms),
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "kafka_processed": self.kafka_processed,
            "heartbeat_failures": self.heartbeat_failures,
            "batches": self.batches,
            "conflated": self.conflated,
            "slow_client_closes": self.slow_client_closes,
            "rate_limit_closes": self.rate_limit_closes,
            "token_expiry_closes": self.token_expiry_closes,
            "refreshes": self.refreshes,
            "paused_connections": self.paused_connections,
            "resume_buffer_entries": self.buffer_entries,
            "resume_buffer_bytes": self.buffer_bytes,
            "resume_buffer_evictions": self.buffer_evictions,
            "state_assessments": len(self._assessments),
            "state_evictions": self.state_evictions,
            "resumes": {"memory": self.resumes_memory, "kafka": self.resumes_kafka,
                        "refused": self.resumes_refused},
            "dropped": {_DROP_REASONS[i]: self._dropped[i] for i in range(1, DROP_COUNT)},
            "ignored": {_IGNORED_REASONS[i]: self._ignored[i]
                        for i in range(IGNORED_COUNT)},
            "closed": dict(self._closed_by_code),
        }


@cython.final
cdef class BatchHandoff:
    """Carry whole batches from the consumer thread to the loop, lock-free.

    The consumer thread appends to a deque (atomic under the GIL) and asks the
    loop for a wake-up only when none is pending, so a burst of batches costs
    one ``call_soon_threadsafe``. The loop clears the flag *before* draining:
    a push that still saw it set is therefore drained by that same pass.
    """

    def __cinit__(self, Router router not None, loop not None):
        self._router = router
        self._queue = collections.deque()
        self._call_soon_threadsafe = loop.call_soon_threadsafe
        self._loop_thread = router._loop_thread

    def push(self, list batch):
        """Hand ``batch`` to the loop (consumer thread)."""
        if PUSHSVC_DEBUG:
            assert PyThread_get_thread_ident() != self._loop_thread, \
                "BatchHandoff.push is for the consumer thread"
        self._queue.append(batch)
        if not self._scheduled:
            self._scheduled = True
            self._call_soon_threadsafe(self._drain)

    def _drain(self):
        cdef list batch
        cdef Py_ssize_t queued
        self._scheduled = False
        self.wakeups += 1
        queue = self._queue
        queued = len(queue)
        if queued == 0:
            return
        self.batches += queued
        if queued == 1:
            self._router.deliver(queue.popleft())
            return
        # Batches that piled up while the loop was busy are routed as one:
        # a connection owed several of their records then gets one write
        # instead of one per batch, at no cost in latency (they are all late
        # already).
        batch = []
        while queued:
            batch.extend(queue.popleft())
            queued -= 1
        self._router.deliver(batch)

    @property
    def pending(self):
        return len(self._queue)
