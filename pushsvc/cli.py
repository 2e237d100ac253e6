"""The ``pushsvc`` command: ``serve``, ``demo``, ``token`` and ``check-config``."""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from .config import Settings
from .errors import ConfigError, PushError

EXIT_CONFIG = 2


def _settings() -> Settings:
    return Settings.from_env()


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from .logs import configure_logging
    from .server import serve

    settings = _settings()
    configure_logging(settings)
    uvloop.run(serve(settings))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from .demo import run_demo

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    logging.getLogger("pushsvc.ws").setLevel(logging.WARNING)
    return run_demo(port=args.port, host=args.host, assessments=args.assessments)


def _cmd_token(args: argparse.Namespace) -> int:
    from .auth import mint_token

    secret = args.secret or os.environ.get("JWT_SECRET")
    if not secret:
        raise ConfigError("JWT_SECRET is not set: set it or pass --secret")
    claims = {}
    if args.assessment:
        claims["assessments"] = args.assessment
    ttl = None if args.ttl <= 0 else args.ttl
    print(mint_token(args.user, secret, ttl_s=ttl, **claims))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings()
    sys.stdout.write(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\nconfiguration OK\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushsvc",
        description="Real-time WebSocket push of Kafka trading events.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service, configured from the environment")
    demo = sub.add_parser(
        "demo", help="run broker, synthetic feed and server locally, no setup"
    )
    demo.add_argument("--port", type=int, default=3003)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--assessments", type=int, default=3)
    token = sub.add_parser("token", help="mint a development token (uses JWT_SECRET)")
    token.add_argument("--user", required=True)
    token.add_argument("--assessment", action="append", help="allowed assessment id")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds; 0 = no exp")
    token.add_argument("--secret", help="signing secret (default: $JWT_SECRET)")
    sub.add_parser("check-config", help="print the effective configuration")
    return parser


_COMMANDS = {
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "token": _cmd_token,
    "check-config": _cmd_check_config,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"pushsvc: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PushError as exc:
        print(f"pushsvc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
