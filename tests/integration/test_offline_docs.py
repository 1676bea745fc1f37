"""/docs (Swagger UI) and /redoc render in Debian's headless Chromium with the network off: every
asset comes from the server itself, and ReDoc asks for no Google Fonts."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow

DEADLINE_S = 120


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def refused_by_policy(message: str) -> bool:
    """A load the page's Content-Security-Policy blocked: it never left the browser."""
    return "violates the following Content Security Policy directive" in message


def check_nothing_came_from_elsewhere(driver, base_url: str) -> None:
    """Every resource the page loaded came from the server; a request for another host is allowed
    only when the page's policy refused it; and the console shows no other error."""
    errors = console_errors(driver)
    refused = " ".join(message for message in errors if refused_by_policy(message))
    urls = driver.execute_script("return performance.getEntriesByType('resource').map((entry) => entry.name)")
    assert [url for url in urls if not url.startswith(base_url) and f"'{url}'" not in refused] == []
    assert [message for message in errors if not refused_by_policy(message)] == []


def test_swagger_ui_fills_in_offline(browser, tiny_server, screenshots):
    browser.get(f"{tiny_server.base_url}/docs")
    operations = WebDriverWait(browser, DEADLINE_S, poll_frequency=0.1).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#swagger-ui .opblock"), "Swagger UI's operations"
    )
    screenshots(browser, "docs-swagger-ui")
    summaries = " ".join(operation.text for operation in operations)
    assert "/v1/images/generations" in summaries and "/v1/models" in summaries
    check_nothing_came_from_elsewhere(browser, tiny_server.base_url)


def test_redoc_renders_offline_without_google_fonts(browser, tiny_server, screenshots):
    browser.get(f"{tiny_server.base_url}/redoc")
    WebDriverWait(browser, DEADLINE_S, poll_frequency=0.1).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "redoc [data-section-id]"), "ReDoc's sections"
    )
    screenshots(browser, "docs-redoc")
    assert "fonts.googleapis.com" not in browser.page_source
    assert "imagegen" in browser.find_element(By.TAG_NAME, "h1").text
    check_nothing_came_from_elsewhere(browser, tiny_server.base_url)
