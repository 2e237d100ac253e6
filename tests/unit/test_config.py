"""Settings come from the environment once, and a bad value stops start-up."""

import pytest

from pushsvc.config import DEFAULT_TOPICS, Settings, env_names
from pushsvc.errors import ConfigError

SECRET = "x" * 32


def test_defaults_match_the_documented_contract():
    settings = Settings.from_env({"JWT_SECRET": SECRET})
    assert settings.port == 3003
    assert settings.heartbeat_interval_ms == 30_000
    assert settings.connection_timeout_ms == 60_000
    assert settings.kafka_client_id == "websocket-service"
    assert settings.kafka_group_id == "websocket-service-group"
    assert settings.kafka_topics == DEFAULT_TOPICS
    assert settings.topic_pattern is not None
    assert settings.topic_pattern.search("trading.pnl")
    assert not settings.topic_pattern.search("other.pnl")


def test_every_variable_is_read():
    env = {
        "JWT_SECRET": SECRET,
        "PORT": "4000",
        "HOST": "127.0.0.1",
        "HEARTBEAT_INTERVAL": "1000",
        "CONNECTION_TIMEOUT": "5000",
        "NODE_ENV": "production",
        "KAFKA_BROKERS": "a:1,b:2",
        "KAFKA_CLIENT_ID": "cid",
        "KAFKA_GROUP_ID": "gid",
        "KAFKA_TOPICS": "t1, t2",
        "LOG_LEVEL": "debug",
    }
    settings = Settings.from_env(env)
    assert settings.port == 4000
    assert settings.heartbeat_interval_ms == 1000
    assert settings.connection_timeout_ms == 5000
    assert settings.is_production
    assert settings.kafka_brokers == "a:1,b:2"
    assert settings.topic_names == ("t1", "t2")
    assert settings.topic_pattern is None
    assert settings.log_level == "DEBUG"


def test_missing_jwt_secret_names_the_variable():
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        Settings.from_env({})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("HEARTBEAT_INTERVAL", "-5"),
        ("CONNECTION_TIMEOUT", "soon"),
        ("KAFKA_TOPICS", "^(unclosed"),
        ("KAFKA_BROKERS", "nohostport"),
        ("LOG_LEVEL", "loud"),
        ("MAX_FRAME_SIZE", "0"),
    ],
)
def test_bad_value_names_variable_and_value(var, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"JWT_SECRET": SECRET, var: value})
    assert var in str(info.value)
    assert repr(value) in str(info.value)


def test_settings_are_frozen_and_hide_the_secret():
    settings = Settings.from_env({"JWT_SECRET": SECRET})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
    assert SECRET not in repr(settings)
    assert settings.masked()["JWT_SECRET"] == "****"
    assert set(settings.masked()) == env_names()
