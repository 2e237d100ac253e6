# The compiled core: connections, rooms, the event decoder and the batch handoff.
from libc.stdint cimport int64_t, uint64_t
from picows.picows cimport WSFrame, WSListener, WSTransport

cdef enum:
    # Event kinds; 0 is reserved for "no kind".
    KIND_MARKET_PRICE = 1
    KIND_PNL_UPDATE = 2
    KIND_POSITION_UPDATE = 3
    KIND_RULE_STATUS = 4
    KIND_VIOLATION = 5
    KIND_ASSESSMENT_UPDATE = 6

cdef enum:
    # Why a Kafka record was dropped; indexes into Router._dropped.
    DROP_NONE = 0
    DROP_INVALID_JSON = 1
    DROP_NOT_OBJECT = 2
    DROP_UNKNOWN_TYPE = 3
    DROP_MISSING_ASSESSMENT = 4
    DROP_KAFKA_ERROR = 5
    DROP_COUNT = 6

cdef enum:
    # Why a client frame was ignored; indexes into Router._ignored.
    IGNORED_INVALID_JSON = 0
    IGNORED_NOT_OBJECT = 1
    IGNORED_UNKNOWN_TYPE = 2
    IGNORED_BINARY = 3
    IGNORED_FRAGMENTED = 4
    IGNORED_COUNT = 5


cdef struct _Record:
    # One Kafka record of a batch, for ordering it without Python objects.
    int64_t ts
    int64_t pkey
    int64_t offset
    Py_ssize_t index


cdef struct _Vec:
    # Partition keys ascending, and an offset for each.
    int64_t* keys
    int64_t* offsets
    Py_ssize_t len
    Py_ssize_t cap


cdef struct _Kept:
    # A message kept for resume (its payload sits in a parallel list).
    int64_t ts
    int64_t pkey
    int64_t offset
    double at


cdef class _AssessmentState:
    # What the router remembers of one assessment: its position vector, the
    # recent messages for resume, and the latest state for the snapshot.
    cdef:
        _Vec pos
        # Per partition, the newest offset the ring no longer holds.
        _Vec evicted
        # The ring of recent messages: C records and, slot for slot, payloads.
        _Kept* kept
        list kept_payloads
        Py_ssize_t kept_head
        Py_ssize_t kept_len
        Py_ssize_t kept_cap
        # Router tick of the last update (approximate LRU eviction).
        uint64_t touched
        bytes pnl
        bytes status
        dict rules
        dict positions
        Py_ssize_t nbytes

    cdef bytes positioned(self, bytes base, int64_t issued_s)
    cdef dict vector(self)
    cdef dict evicted_upto(self)
    cdef int keep(self, int64_t ts, int64_t pkey, int64_t offset, bytes payload,
                  double at, Py_ssize_t limit) except -1
    cdef Py_ssize_t drop_oldest(self) except -1
    cdef list kept_items(self)


cdef class Connection(WSListener):
    cdef:
        readonly str connection_id
        readonly str user_id
        readonly str assessment_id
        readonly double connected_at
        readonly double last_seen
        Router _router
        WSTransport _transport
        Py_ssize_t _index
        Py_ssize_t _room_index
        bytes _pending
        char* _buf
        Py_ssize_t _buf_len
        Py_ssize_t _buf_cap
        bint _buf_used
        Py_ssize_t _queued
        int _invalid_frames
        double _invalid_window_start
        bint _closing
        int _recv_close_code
        object _close_timer
        public double expires_at
        # Backpressure: set while picows reports the transport over its high
        # watermark; frames then wait in _backlog, state-like ones conflated.
        bint _paused
        list _backlog
        dict _backlog_keys
        Py_ssize_t _backlog_bytes
        # Inbound rate limit: frames in the current one-second window.
        double _rate_window_start
        int _rate_count
        # Resume: the position the client came back with; while a read-back
        # from Kafka runs, live frames are held (in _backlog, not conflated).
        str _since
        bint _holding
        dict _floor

    cdef inline int _enqueue(self, bytes frame, str ckey) except -1
    cdef int _defer(self, bytes frame, str ckey) except -1
    cdef int _drain_backlog(self) except -1
    cdef int _on_refresh(self, dict message) except -1
    cdef int _write_frames(self, list payloads) except -1
    cdef int _flush(self) except -1
    cdef int _buf_append(self, const char* data, Py_ssize_t size) except -1
    cdef int _write_buf(self, WSTransport t) except -1
    cdef void _buf_release(self) noexcept
    cdef int _on_text(self, WSFrame frame) except -1
    cdef int _on_invalid(self, int reason) except -1
    cdef int _send_now(self, object message) except -1
    cpdef close(self, int code, str reason)


cdef class Router:
    cdef:
        dict _rooms
        list _conns
        list _dirty
        list _spare
        object _logger
        bint _log_debug
        object _on_closed
        double _heartbeat_interval_s
        double _connection_timeout_s
        int _max_invalid_frames
        int _max_messages_per_s
        Py_ssize_t _max_buffer_bytes
        int _sndbuf
        bint _require_assessment_claim
        object _token_verifier
        object _on_readback
        object _live_check
        bint _live
        list _warm
        object _assessments  # OrderedDict: str -> _AssessmentState
        uint64_t _tick
        double _now
        dict _prices
        dict _positions
        dict _pkey_topics
        dict _first_offsets
        int _buffer_events
        Py_ssize_t _buffer_max_bytes
        Py_ssize_t _state_max
        bint _track
        double _resume_max_age_s
        readonly Py_ssize_t buffer_bytes
        readonly Py_ssize_t buffer_entries
        readonly uint64_t buffer_evictions
        readonly uint64_t state_evictions
        readonly uint64_t resumes_memory
        readonly uint64_t resumes_kafka
        readonly uint64_t resumes_refused
        double _next_ping
        double _last_drop_log
        uint64_t _drops_since_log
        readonly uint64_t messages_sent
        readonly uint64_t messages_received
        readonly uint64_t kafka_processed
        readonly uint64_t heartbeat_failures
        readonly uint64_t batches
        readonly uint64_t conflated
        readonly uint64_t slow_client_closes
        readonly uint64_t rate_limit_closes
        readonly uint64_t token_expiry_closes
        readonly uint64_t refreshes
        readonly Py_ssize_t paused_connections
        uint64_t _dropped[DROP_COUNT]
        uint64_t _ignored[IGNORED_COUNT]
        dict _closed_by_code
        # Scratch output of _decode, valid until the next call.
        int _ev_kind
        str _ev_room
        str _ev_ckey
        int64_t _ev_pkey
        int64_t _ev_offset
        bytes _ev_payload
        unsigned long _loop_thread

    cdef int _decode(self, object raw, str topic, object key, int64_t ts_ms,
                     int64_t pkey=*, int64_t offset=*, bint track=*) except -1
    cdef _AssessmentState _state(self, str room)
    cdef int _remember(self, _AssessmentState st, dict event, int64_t ts_ms) except -1
    cdef int _trim(self, _AssessmentState st, double now) except -1
    cdef int _evict_state(self) except -1
    cdef int _merge_records(self, _Record* records, Py_ssize_t count) except -1
    cdef int _evict_oldest(self, _AssessmentState st) except -1
    cdef bytes _snapshot(self, Connection conn)
    cdef object _plan_resume(self, Connection conn)
    cdef int _process_warm(self) except -1
    cdef int _check_live(self) except -1
    cdef int _fan_out(self) except -1
    cdef int _flush(self) except -1
    cdef int _register(self, Connection conn) except -1
    cdef int _unregister(self, Connection conn) except -1
    cdef int _count_drop(self, int reason, object topic, object raw) except -1
    cdef int _count_close(self, int code) except -1
    cpdef deliver(self, list batch)
    cpdef sweep(self)


cdef class BatchHandoff:
    cdef:
        object _queue
        object _call_soon_threadsafe
        Router _router
        bint _scheduled
        readonly uint64_t wakeups
        readonly uint64_t batches
        unsigned long _loop_thread
