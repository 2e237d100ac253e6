"""The websockets baseline (benchmarks/baselines/websockets_server.py) against the
same routing, invalid-record and authentication checks as pushsvc.

The test functions are imported from the pushsvc test modules, so both servers
are held to literally the same assertions; only the ``server`` fixture differs:
it starts ``python -m benchmarks.baselines.websockets_server`` through
``utils.run_server(cmd=...)``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from utils import (
    Broker,
    Server,
    client,
    create_topics,
    produce,
    run_server,
    uid,
)

# Imported test functions are collected here again, against this module's server.
# (test_routing's test_kafka_topics_setting_selects_topics starts pushsvc itself,
# so its baseline twin is written out below.)
from .test_auth import (  # noqa: F401
    test_bad_token_rejected_with_401_json,
    test_connected_message_fields,
    test_connection_ids_are_unique,
    test_connection_without_assessment_is_accepted,
    test_rejection_does_not_disturb_server,
    test_token_with_future_exp_is_accepted,
    test_token_without_exp_is_accepted,
    test_user_id_claim_preferred_over_sub,
    test_user_id_falls_back_to_sub,
)
from .test_invalid_records import (  # noqa: F401
    test_dropped_records_counted_by_reason,
    test_empty_value_counted_as_invalid_json,
    test_invalid_record_not_delivered_next_one_is,
    test_market_stream_survives_invalid_records,
    test_missing_assessment_counted,
    test_scoped_record_without_assessment_not_delivered,
)
from .test_routing import (  # noqa: F401
    seed_prestart_records,
    test_assessments_are_isolated,
    test_events_of_one_partition_arrive_in_order,
    test_every_connection_of_an_assessment_receives,
    test_explicit_type_on_neutral_topic,
    test_late_topic_with_several_partitions_fully_delivered,
    test_market_price_reaches_every_connection,
    test_market_price_type_inferred_from_topic,
    test_missing_timestamp_filled_for_market_price,
    test_missing_timestamp_filled_from_record_timestamp,
    test_non_matching_topic_is_ignored,
    test_present_timestamp_passed_through,
    test_record_key_routes_when_value_has_no_assessment,
    test_records_from_before_start_are_not_delivered,
    test_scoped_type_inferred_from_topic,
    test_snake_case_keys_become_camel_case,
    test_topic_created_after_start_is_picked_up_from_beginning,
    test_value_assessment_wins_over_record_key,
)

BASELINE_CMD = [sys.executable, "-m", "benchmarks.baselines.websockets_server"]


@pytest.fixture(scope="module")
def server(broker: Broker) -> Iterator[Server]:
    """The baseline, started like test_routing's pushsvc: topics exist and hold
    records (which must not be delivered) before it starts."""
    seed_prestart_records(broker)
    with run_server(broker, cmd=BASELINE_CMD) as s:
        yield s
    assert s.process.returncode == 0, f"exit code {s.process.returncode} on SIGTERM"


async def test_kafka_topics_list_selects_topics(server: Server, broker: Broker) -> None:
    """KAFKA_TOPICS as a comma-separated list: a second baseline consumes exactly
    the listed topics (a default topic not in the list is not consumed)."""
    listed, unlisted = f"custom.{uid('feed')}", "market-data.prices"
    create_topics(broker.bootstrap, {listed: 2})
    env = {"KAFKA_TOPICS": f"{listed}, trading.pnl"}
    with run_server(broker, cmd=BASELINE_CMD, **env) as custom:
        symbol, ignored = uid("SYM"), uid("SYM")
        async with client(custom, uid("u")) as c:
            produce(broker.bootstrap, unlisted, {"symbol": ignored}, key=ignored)
            value = {"type": "market_price", "symbol": symbol}
            produce(broker.bootstrap, listed, value, key=symbol)
            msg = await c.recv_until(lambda m: m.get("symbol") == symbol)
            await c.collect_for(0.5)
        assert msg["type"] == "market_price"
        assert all(m.get("symbol") != ignored for m in c.received), c.received
