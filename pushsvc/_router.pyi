"""Types of the compiled router's Python surface (see _router.pyx)."""

from collections.abc import Callable
from typing import Any

from picows import WSFrame, WSListener, WSTransport

KIND_NAMES: tuple[str, ...]
DROP_REASONS: tuple[str, ...]
IGNORED_REASONS: tuple[str, ...]
CLOSE_HEARTBEAT_TIMEOUT: int
CLOSE_TOKEN_EXPIRED: int
CLOSE_POLICY_VIOLATION: int
CLOSE_TRY_AGAIN_LATER: int

def monotonic() -> float: ...
def iso_utc(ms: int) -> str: ...
def camel(key: str) -> str: ...
def make_frame(payload: bytes) -> bytes: ...
def encode_pos(vector: dict[int, int], issued_s: int) -> str: ...
def decode_pos(token: str) -> tuple[int, dict[int, int]]: ...

class Connection(WSListener):
    connection_id: str
    user_id: str
    assessment_id: str | None
    connected_at: float
    last_seen: float
    expires_at: float
    def __init__(
        self,
        router: Router,
        user_id: str,
        assessment_id: str | None = None,
        connection_id: str | None = None,
        expires_at: float = 0.0,
        since: str | None = None,
    ) -> None: ...
    def on_ws_connected(self, transport: WSTransport) -> None: ...
    def on_ws_disconnected(self, transport: WSTransport) -> None: ...
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def finish_resume(
        self,
        records: list[tuple[str, int, int, bytes | None, bytes | None, int]],
        vector: dict[int, int],
        events: list[Any],
        error: str | None = None,
    ) -> None: ...

class Router:
    messages_sent: int
    messages_received: int
    kafka_processed: int
    heartbeat_failures: int
    batches: int
    conflated: int
    slow_client_closes: int
    rate_limit_closes: int
    token_expiry_closes: int
    refreshes: int
    paused_connections: int
    on_closed: Callable[[Connection, int], None] | None
    token_verifier: Callable[[str], Any] | None
    on_readback: Callable[..., None] | None
    live_check: Callable[[], bool] | None
    def __init__(
        self,
        *,
        heartbeat_interval_ms: float = 30000,
        connection_timeout_ms: float = 60000,
        max_invalid_frames: int = 20,
        max_messages_per_s: int = 50,
        max_buffer_bytes: int = 1048576,
        socket_send_buffer: int = 0,
        require_assessment_claim: bool = False,
        resume_buffer_size: int = 256,
        resume_buffer_max_bytes: int = 67108864,
        resume_max_age_ms: float = 300000,
        state_max_assessments: int = 100000,
        resume: bool = True,
        token_verifier: Callable[[str], Any] | None = None,
        on_closed: Callable[[Connection, int], None] | None = None,
    ) -> None: ...
    @property
    def connection_count(self) -> int: ...
    @property
    def room_count(self) -> int: ...
    def connections(self) -> list[Connection]: ...
    def room_size(self, assessment_id: str) -> int: ...
    def deliver(self, batch: list[Any]) -> None: ...
    def route(
        self,
        value: bytes | None,
        topic: str,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
    ) -> str | None: ...
    def normalize(
        self,
        value: bytes | None,
        topic: str,
        key: bytes | None = None,
        timestamp_ms: int = 0,
    ) -> tuple[str, str | None, bytes]: ...
    def sweep(self) -> None: ...
    def close_all(self, code: int, reason: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...

class BatchHandoff:
    wakeups: int
    batches: int
    def __init__(self, router: Router, loop: Any) -> None: ...
    def push(self, batch: list[Any]) -> None: ...
    @property
    def pending(self) -> int: ...
