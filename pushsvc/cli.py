"""The ``pushsvc`` command: ``serve``, ``demo``, ``token`` and ``check-config``."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .config import _ENV_NAMES, _PARSERS, _SECRETS, Settings
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


@dataclass
class ConfigReport:
    """What ``check-config`` found.

    :param values: every setting by variable name, secrets masked; the
        default where the variable is unset, the raw text where it is invalid.
    :param from_env: the variables that are set (non-empty) in the environment.
    :param errors: what stops the service from starting, each naming its
        variable; empty when the configuration is valid.
    :param warnings: what starts but is probably not meant.
    """

    values: dict[str, Any] = field(default_factory=dict)
    from_env: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# Prefixes of the variables pushsvc reads: a variable with one of them that
# pushsvc does not read is probably a typo.
_OUR_PREFIXES = (
    "KAFKA_", "JWT_", "HEARTBEAT_", "CONNECTION_", "MAX_", "SHUTDOWN_", "HANDSHAKE_",
    "LISTEN_", "ALLOWED_", "REQUIRE_", "SOCKET_", "SERVE_", "LOG_",
)  # fmt: skip
_MIN_SECRET_BYTES = 32


def _display(name: str, value: Any) -> Any:
    if name in _SECRETS:
        return "****"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def check_config(environ: Mapping[str, str] | None = None) -> ConfigReport:
    """Read the configuration like ``pushsvc serve`` does, but collect every
    problem instead of stopping at the first.

    :param environ: the environment (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    report = ConfigReport()
    parsed: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        var = _ENV_NAMES[f.name]
        raw = env.get(var)
        default = f.default if f.default is not dataclasses.MISSING else None
        if raw is None or raw == "":
            report.values[var] = _display(f.name, default)
            continue
        report.from_env.add(var)
        try:
            parsed[f.name] = _PARSERS.get(f.name, str)(raw.strip())
        except ValueError as exc:
            shown = "****" if f.name in _SECRETS else raw
            report.values[var] = f"{shown} (invalid)"
            report.errors.append(f"{var}={shown!r} is invalid: {exc}")
            continue
        report.values[var] = _display(f.name, parsed[f.name])
    if "jwt_secret" in parsed:
        size = len(parsed["jwt_secret"].encode())
        report.values["JWT_SECRET"] = f"**** ({size} bytes)"
        if size < _MIN_SECRET_BYTES:
            report.warnings.append(
                f"JWT_SECRET is {size} bytes: HS256 wants at least "
                f"{_MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 48`)"
            )
    # Rules over several variables live in Settings.from_env; run it on the
    # values that parsed (a stand-in secret when it is missing), so they are
    # checked even while another variable is wrong.
    valid_env = {_ENV_NAMES[name]: env[_ENV_NAMES[name]] for name in parsed}
    valid_env.setdefault("JWT_SECRET", "x" * _MIN_SECRET_BYTES)
    try:
        settings = Settings.from_env(valid_env)
    except ConfigError as exc:
        report.errors.append(str(exc))
        settings = None
    if "jwt_secret" not in parsed and "JWT_SECRET" not in report.from_env:
        report.values["JWT_SECRET"] = "(not set)"
        report.errors.insert(
            0,
            "JWT_SECRET is not set: set it to the HS256 secret that signs client "
            "tokens (for a local try, run `pushsvc demo`)",
        )
    if settings is not None:
        report.warnings.extend(_config_warnings(settings, report.from_env))
    known = set(_ENV_NAMES.values())
    for var in sorted(env):
        if var in known or not var.startswith(_OUR_PREFIXES):
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        report.warnings.append(f"{var} is set but pushsvc does not read it{hint}")
    return report


def _config_warnings(settings: Settings, from_env: set[str]) -> list[str]:
    warnings = []
    if settings.connection_timeout_ms <= settings.heartbeat_interval_ms:
        warnings.append(
            f"CONNECTION_TIMEOUT ({settings.connection_timeout_ms} ms) is not "
            f"longer than HEARTBEAT_INTERVAL ({settings.heartbeat_interval_ms} ms): "
            "clients that only answer pings will be timed out"
        )
    if settings.node_env not in ("development", "production", "test"):
        warnings.append(
            f"NODE_ENV={settings.node_env!r} is not production: logs are "
            "human-readable lines, not JSON"
        )
    if settings.is_production and "KAFKA_BROKERS" not in from_env:
        warnings.append(
            f"KAFKA_BROKERS is not set: using {settings.kafka_brokers} in production"
        )
    if settings.is_production and settings.serve_dashboard:
        warnings.append(
            "SERVE_DASHBOARD=true in production: the live page is served at /"
        )
    return warnings


def _cmd_check_config(args: argparse.Namespace) -> int:
    report = check_config()
    if args.json:
        out = {
            "ok": report.ok,
            "settings": report.values,
            "errors": report.errors,
            "warnings": report.warnings,
        }
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        width = max(len(var) for var in report.values)
        lines = ["effective configuration (* = from the environment, else default):"]
        for var, value in report.values.items():
            mark = "*" if var in report.from_env else " "
            shown = "true" if value is True else "false" if value is False else value
            lines.append(f"  {mark} {var:<{width}}  {shown}")
        if report.warnings:
            lines.append("warnings:")
            lines.extend(f"  - {w}" for w in report.warnings)
        if report.ok:
            lines.append("configuration OK")
        else:
            lines.append(f"configuration INVALID ({len(report.errors)} problem(s)):")
            lines.extend(f"  - {e}" for e in report.errors)
        sys.stdout.write("\n".join(lines) + "\n")
    for error in report.errors:
        print(f"pushsvc: configuration error: {error}", file=sys.stderr)
    return 0 if report.ok else EXIT_CONFIG


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
    check = sub.add_parser(
        "check-config",
        help="print the effective configuration (secrets masked) and what is "
        "wrong with it; exit 2 if it is invalid",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
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
