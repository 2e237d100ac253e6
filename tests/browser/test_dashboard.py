"""The live page in a real headless Chromium, driven by Selenium: it connects,
shows produced prices and P&L within a second, renders positions, rule status
colours and violations, survives a server restart by reconnecting, and logs no
console errors.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them
where it can, as root with apt) and the ``selenium`` package; without them the
tests skip and say why. No browser is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from utils import (
    REPO_ROOT,
    Broker,
    KafkaProducer,
    Server,
    free_port,
    make_token,
    run_server,
    uid,
)

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
)
SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
"""Written when missing, or with PUSHSVC_UPDATE_SCREENSHOT=1."""

WAIT = 10.0
# The page's own reconnect and a server start-up together.
RESTART_WAIT = 30.0
# Chromium logs every refused WebSocket attempt as an error of its own (not of
# the page); while the server is down, that is expected.
_REFUSED_WS = re.compile(r"WebSocket connection to '.*' failed")

# The dashboard stylesheet's status colours (ok, warning, breached).
RULE_COLOURS = {
    "ok": (46, 160, 67),
    "warning": (210, 153, 34),
    "breached": (248, 81, 73),
}


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return (
                f"{path} not found: install Debian's {package} "
                "(apt-get install chromium chromium-driver; `make test` does this "
                "as root)"
            )
    return None


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    return {"SERVE_DASHBOARD": "true"}


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="pushsvc-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # a broken install must say so, not pass silently
        shutil.rmtree(profile, ignore_errors=True)
        pytest.fail(f"chromium is installed but did not start: {exc}")
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: WebDriver) -> Iterator[WebDriver]:
    """The browser, its console emptied before the test and checked after it:
    no error, no uncaught exception."""
    browser.get_log("browser")
    yield browser
    errors = console_errors(browser)
    browser.get("about:blank")
    assert not errors, f"console errors: {errors}"


def console_errors(
    driver: WebDriver, allow: Callable[[str], bool] = lambda text: False
) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not allow(entry["message"])
    ]


def page_url(server: Server, token: str, assessment: str) -> str:
    return f"{server.http_url}/?token={token}&assessmentId={assessment}"


def wait_for(
    driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float, what: str
) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"{what} not within {timeout}s; page shows:\n"
            + driver.find_element(By.TAG_NAME, "body").text
        ) from None


def text_of(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return str(found[0].text) if found else ""


def wait_open(driver: WebDriver, timeout: float = WAIT) -> str:
    """Wait for status open and a connection id; return the id."""
    wait_for(
        driver,
        lambda d: (
            d.find_element(By.ID, "status").get_attribute("data-status") == "open"
            and text_of(d, "#connection-id") not in ("", "–")
        ),
        timeout,
        "an open connection",
    )
    return text_of(driver, "#connection-id")


def test_connects_and_shows_price_and_pnl_within_a_second(
    page: WebDriver, server: Server, broker: Broker
) -> None:
    assessment, market = uid(), uid("MKT")
    page.get(page_url(server, make_token(uid("u")), assessment))
    wait_open(page)
    assert text_of(page, "#assessment-id") == assessment
    assert "token=" not in page.current_url, "the token stays in the address bar"

    producer = KafkaProducer(broker.bootstrap)
    started = time.monotonic()
    producer.send("market-data.prices", {"market": market, "price": 123.45}, market)
    producer.send(
        "trading.pnl",
        {
            "assessment_id": assessment,
            "unrealized_pnl": -42.5,
            "realized_pnl": 17.25,
            "current_balance": 99974.75,
        },
        assessment,
    )
    producer.flush()
    row = f'#prices tr[data-market="{market}"] .price'
    wait_for(page, lambda d: text_of(d, row) == "123.45", 1.0, "the price")
    wait_for(page, lambda d: text_of(d, "#pnl-unrealized") == "-42.50", 1.0, "the P&L")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"price and P&L took {elapsed:.3f}s"
    assert text_of(page, "#pnl-realized") == "+17.25"
    assert text_of(page, "#pnl-balance") == "99,974.75"


def test_positions_rules_violations(
    page: WebDriver, server: Server, broker: Broker, tmp_path: Path
) -> None:
    assessment = uid("assessment")
    page.get(page_url(server, make_token(uid("u")), assessment))
    wait_open(page)
    producer = KafkaProducer(broker.bootstrap)

    def send(topic: str, **value: Any) -> None:
        producer.send(topic, {"assessment_id": assessment, **value}, assessment)

    for market, price in (
        ("BTC-USD", 64210.5),
        ("ETH-USD", 3391.2),
        ("SOL-USD", 151.37),
        ("EUR-USD", 1.0832),
    ):
        producer.send("market-data.prices", {"market": market, "price": price}, market)
        producer.send(
            "market-data.prices", {"market": market, "price": price * 1.0004}, market
        )
    send("assessment.status", status="active")
    send(
        "trading.pnl",
        unrealized_pnl=412.8,
        realized_pnl=-120.4,
        current_balance=100292.4,
    )
    for position, market, side, qty, entry in (
        ("p-btc", "BTC-USD", "long", 0.5, 63990.0),
        ("p-eth", "ETH-USD", "short", 2.0, 3402.1),
        ("p-sol", "SOL-USD", "long", 10.0, 149.9),
    ):
        send(
            "trading.positions",
            position_id=position,
            market=market,
            side=side,
            quantity=qty,
            entry_price=entry,
            unrealized_pnl=round(qty * 21.3, 2),
        )
    send(
        "trading.positions",
        position_id="p-sol",
        market="SOL-USD",
        side="long",
        quantity=0,
        entry_price=149.9,
        unrealized_pnl=0,
    )
    for rule, value, threshold, status in (
        ("max_daily_loss", 1200, 5000, "ok"),
        ("max_drawdown", 8400, 10000, "warning"),
        ("max_position_size", 6, 5, "breached"),
    ):
        send(
            "risk.rule-status",
            rule=rule,
            value=value,
            threshold=threshold,
            status=status,
        )
    send("risk.violations", rule="max_position_size", value=6, threshold=5)
    producer.flush()

    wait_for(
        page,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rules li")) == 3,
        WAIT,
        "three rules",
    )
    wait_for(page, lambda d: text_of(d, "#violations li"), WAIT, "a violation")
    wait_for(
        page,
        lambda d: text_of(d, "#assessment-status") == "active",
        WAIT,
        "the assessment status",
    )
    wait_for(
        page,
        lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-position-id="p-sol"]'),
        WAIT,
        "p-sol closed",
    )
    positions = [
        r.get_attribute("data-position-id")
        for r in page.find_elements(By.CSS_SELECTOR, "#positions tbody tr")
    ]
    assert positions == ["p-btc", "p-eth"]
    for rule, status in (
        ("max_daily_loss", "ok"),
        ("max_drawdown", "warning"),
        ("max_position_size", "breached"),
    ):
        li = page.find_element(By.CSS_SELECTOR, f'#rules li[data-rule="{rule}"]')
        assert li.get_attribute("data-status") == status
        colour = li.value_of_css_property("border-left-color")
        rgb = tuple(int(n) for n in re.findall(r"\d+", colour)[:3])
        assert rgb == RULE_COLOURS[status], (rule, colour)
    alert = page.find_element(By.CSS_SELECTOR, "#violations li")
    assert alert.get_attribute("role") == "alert"
    assert "max position size" in alert.text.lower()

    time.sleep(0.7)  # let the tick flashes fade before the picture
    page.save_screenshot(str(tmp_path / "dashboard.png"))
    if not SCREENSHOT.exists() or os.environ.get("PUSHSVC_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)


def test_survives_a_server_restart(page: WebDriver, broker: Broker) -> None:
    """The server process is stopped (SIGTERM: its clients get 1001) and a new
    one starts on the same port; the page reconnects by itself and shows what
    the new server delivers."""
    port, market = free_port(), uid("MKT")
    env = {"PORT": port, "SERVE_DASHBOARD": "true", "SHUTDOWN_DRAIN": 0}
    with run_server(broker, **env) as first:
        page.get(page_url(first, make_token(uid("u")), uid()))
        before = wait_open(page)
    wait_for(
        page,
        lambda d: (
            d.find_element(By.ID, "status").get_attribute("data-status")
            == "reconnecting"
        ),
        WAIT,
        "the reconnecting status",
    )
    with run_server(broker, **env) as second:
        after = wait_open(page, RESTART_WAIT)
        assert after != before
        producer = KafkaProducer(broker.bootstrap)
        producer.send("market-data.prices", {"market": market, "price": 7.5}, market)
        producer.flush()
        row = f'#prices tr[data-market="{market}"] .price'
        wait_for(page, lambda d: text_of(d, row) == "7.5000", WAIT, "a price")
        assert second.port == first.port
    # Only the browser's own reports of refused attempts while the port was
    # closed are allowed; nothing from the page.
    errors = console_errors(page, allow=lambda text: bool(_REFUSED_WS.search(text)))
    assert not errors, f"console errors: {errors}"
