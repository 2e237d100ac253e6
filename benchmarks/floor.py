"""The kernel floor: what raw ``socket.send()`` of the same bytes costs.

pushsvc's hot path ends in one ``send()`` per connection and batch; nothing the
router does can make delivery cheaper than that syscall. This module measures it
on its own: ``N`` loopback TCP connections, a reader process draining the far
ends with epoll, and the sender (this process) writing one frame of the given
size to every connection, round after round. It reports

- sender CPU per message (``time.thread_time_ns``, i.e. the sending thread's
  CPU, user + system) for one frame per ``send()``;
- the same with ``coalesce`` frames in one ``send()`` (pushsvc writes all the
  frames of one batch for one connection at once), per message;
- the wall time of one broadcast: one ``send()`` to each of the ``N`` sockets.

Run alone::

    python -m benchmarks.floor --connections 1000 --frame-bytes 160

``python -m benchmarks.load`` runs it after its rounds, with the connection count
and the mean frame size of the run, and reports the server against it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import resource
import select
import socket
import statistics
import sys
import time
from typing import Any

import orjson

LOOPBACK = "127.0.0.1"
SETUP_TIMEOUT_S = 60.0
"""Upper bound (seconds) for the reader to start and accept every connection."""

_FD_HEADROOM = 200
_WANT_NOFILE = 65536
_RECV_CHUNK = 1 << 16


def raise_nofile_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit.

    :returns: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if hard < _WANT_NOFILE:
        # Root may lift the hard limit too (children inherit it): 20k
        # connections need more descriptors than many default hard limits.
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_WANT_NOFILE, _WANT_NOFILE))
            return _WANT_NOFILE
        except (ValueError, OSError):
            pass
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _reader_main(
    control: multiprocessing.connection.Connection, connections: int, timeout_s: float
) -> None:
    """Accept ``connections`` sockets and drain them until told to stop."""
    raise_nofile_limit()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(4096)
    listener.settimeout(1.0)
    control.send(("port", listener.getsockname()[1]))
    accepted: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    while len(accepted) < connections and time.monotonic() < deadline:
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        sock.setblocking(False)
        accepted[sock.fileno()] = sock
    listener.close()
    control.send(("accepted", len(accepted)))
    epoll = select.epoll()
    for fd in accepted:
        epoll.register(fd, select.EPOLLIN)
    epoll.register(control.fileno(), select.EPOLLIN)
    buffer = bytearray(_RECV_CHUNK)
    total = 0
    stop = False
    # Bounded by the stop message, the parent going away, or the deadline below.
    hard_deadline = time.monotonic() + 3600.0
    while not stop and time.monotonic() < hard_deadline:
        for fd, _events in epoll.poll(1.0):
            if fd == control.fileno():
                stop = True
                continue
            sock = accepted[fd]
            for _ in range(64):  # bounded per wake-up so no socket starves others
                try:
                    n = sock.recv_into(buffer)
                except BlockingIOError:
                    break
                except OSError:
                    n = 0
                if n == 0:
                    epoll.unregister(fd)
                    break
                total += n
    try:
        control.recv()
    except (EOFError, OSError):
        pass
    epoll.close()
    for sock in accepted.values():
        sock.close()
    try:
        control.send(("bytes", total))
    except OSError:
        pass


def _broadcast_rounds(
    sends: list[Any], payload: bytes, rounds: int
) -> tuple[int, int, list[float]]:
    """Send ``payload`` once to every socket, ``rounds`` times.

    :returns: (sender thread CPU ns, bytes sent, wall seconds of each round).
    """
    walls: list[float] = []
    sent = 0
    cpu0 = time.thread_time_ns()
    for _ in range(rounds):
        t0 = time.perf_counter()
        for send in sends:
            sent += send(payload)
        walls.append(time.perf_counter() - t0)
    return time.thread_time_ns() - cpu0, sent, walls


def measure_floor(
    connections: int,
    frame_bytes: int,
    *,
    sends: int = 200_000,
    coalesce: int = 4,
    max_connections: int | None = None,
) -> dict[str, Any]:
    """Measure the cost of raw ``send()`` over ``connections`` loopback sockets.

    :param connections: loopback TCP connections to spread the sends over; capped
        by the file-descriptor limit (both ends live on this machine).
    :param frame_bytes: bytes per message (a framed WebSocket message).
    :param sends: messages to send in the single-frame measurement (default
        200,000); the coalesced run sends as many messages in ``sends / coalesce``
        calls.
    :param coalesce: messages per ``send()`` in the coalesced run (default 4).
    :param max_connections: optional cap on ``connections`` (default: the
        ``RLIMIT_NOFILE`` soft limit, raised to the hard one, less headroom).
    :returns: a JSON-ready dict; times in microseconds (``_us``) or milliseconds
        (``_ms``).
    """
    if connections < 1 or frame_bytes < 1 or sends < 1 or coalesce < 1:
        raise ValueError(
            f"connections, frame_bytes, sends and coalesce must be >= 1, got "
            f"{connections}, {frame_bytes}, {sends}, {coalesce}"
        )
    limit = raise_nofile_limit()
    # Sender and reader are two processes: each holds one end of every pair.
    cap = max_connections if max_connections is not None else limit - _FD_HEADROOM
    cap = max(1, cap)
    used = min(connections, cap)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    reader = ctx.Process(
        target=_reader_main, args=(child, used, SETUP_TIMEOUT_S), daemon=True
    )
    socks: list[socket.socket] = []
    reader.start()
    try:
        child.close()
        if not parent.poll(SETUP_TIMEOUT_S):
            raise TimeoutError("floor reader did not start")
        try:
            _, port = parent.recv()
        except EOFError:
            reader.join(5.0)
            raise RuntimeError(
                f"floor reader exited at start with code {reader.exitcode}"
            ) from None
        for _ in range(used):
            sock = socket.create_connection((LOOPBACK, port), timeout=10.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        if not parent.poll(SETUP_TIMEOUT_S):
            raise TimeoutError("floor reader did not accept the connections")
        _, accepted = parent.recv()
        if accepted != used:
            raise RuntimeError(
                f"floor reader accepted {accepted} of {used} connections"
            )
        send_calls = [sock.send for sock in socks]
        one = b"x" * frame_bytes
        many = one * coalesce
        rounds = max(3, sends // used)
        rounds_many = max(3, sends // (used * coalesce))
        _broadcast_rounds(send_calls, one, 2)  # warm the sockets and the caches
        cpu_one, bytes_one, walls = _broadcast_rounds(send_calls, one, rounds)
        cpu_many, bytes_many, _ = _broadcast_rounds(send_calls, many, rounds_many)
        for sock in socks:
            sock.shutdown(socket.SHUT_WR)
        parent.send("stop")
        received = parent.recv()[1] if parent.poll(SETUP_TIMEOUT_S) else None
        messages_one = rounds * used
        messages_many = rounds_many * used * coalesce
        return {
            "connections": used,
            "connections_requested": connections,
            "frame_bytes": frame_bytes,
            "single": {
                "messages": messages_one,
                "bytes": bytes_one,
                "cpu_us_per_message": cpu_one / messages_one / 1000.0,
                "broadcast_ms_median": statistics.median(walls) * 1000.0,
                "broadcast_ms_min": min(walls) * 1000.0,
            },
            "coalesced": {
                "messages_per_send": coalesce,
                "messages": messages_many,
                "bytes": bytes_many,
                "cpu_us_per_message": cpu_many / messages_many / 1000.0,
                "cpu_us_per_send": cpu_many * coalesce / messages_many / 1000.0,
            },
            "reader_bytes": received,
        }
    finally:
        for sock in socks:
            sock.close()
        parent.close()
        reader.join(10.0)
        if reader.is_alive():
            reader.kill()
            reader.join(5.0)


def format_floor(result: dict[str, Any]) -> str:
    """A few human lines describing a :func:`measure_floor` result."""
    single, many = result["single"], result["coalesced"]
    return "\n".join(
        [
            f"kernel floor over {result['connections']} loopback TCP connections, "
            f"{result['frame_bytes']}-byte frames:",
            f"  send() of 1 frame:        {single['cpu_us_per_message']:7.2f} us CPU "
            "per message",
            f"  send() of {many['messages_per_send']} frames:       "
            f"{many['cpu_us_per_message']:7.2f} us CPU per message "
            f"({many['cpu_us_per_send']:.2f} us per send)",
            f"  one broadcast to all:     {single['broadcast_ms_median']:7.2f} ms "
            f"median, {single['broadcast_ms_min']:.2f} ms min",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor",
        description="Measure raw send() cost over loopback TCP: the floor under "
        "any WebSocket fan-out.",
    )
    parser.add_argument(
        "--connections", type=int, default=1000, help="loopback connections (1000)"
    )
    parser.add_argument(
        "--frame-bytes", type=int, default=160, help="bytes per message (160)"
    )
    parser.add_argument(
        "--sends", type=int, default=200_000, help="messages per measurement (200000)"
    )
    parser.add_argument(
        "--coalesce", type=int, default=4, help="messages per send() in run 2 (4)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = parser.parse_args(argv)
    result = measure_floor(
        args.connections, args.frame_bytes, sends=args.sends, coalesce=args.coalesce
    )
    print(format_floor(result))
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
