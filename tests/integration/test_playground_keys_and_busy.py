"""The playground on a server with API keys and a one-image queue: the page loads without a key and
asks for one, keeps it in localStorage, and a busy server (429) shows "busy, retrying" until the
page's retry after Retry-After gets in."""

from __future__ import annotations

import httpx
import pytest
from helpers import TEST_API_KEY, queue_held_full
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow

DEADLINE_S = 120


def wait(driver, condition, what: str):
    return WebDriverWait(driver, DEADLINE_S, poll_frequency=0.1).until(condition, f"waited for {what}")


def error_text(driver) -> str:
    return driver.find_element(By.ID, "error").text


def submit_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)


def test_page_docs_and_assets_need_no_key_but_the_api_does(keyed_server):
    for path in ("/", "/static/playground/playground.js", "/docs", "/redoc", "/openapi.json",
                 "/static/docs/swagger-ui-bundle.js"):
        assert httpx.get(f"{keyed_server.base_url}{path}", timeout=30).status_code == 200, path
    assert httpx.get(f"{keyed_server.base_url}/v1/models", timeout=30).status_code == 401


def test_key_is_asked_for_kept_and_sent_as_bearer(browser, keyed_server, screenshots):
    browser.get(f"{keyed_server.base_url}/")
    wait(browser, lambda d: "API key" in error_text(d), "the 401 from /v1/models")
    assert "You didn't provide an API key" in error_text(browser)
    screenshots(browser, "playground-no-key")
    submit_key(browser, "wrong-key")
    wait(browser, lambda d: "Incorrect API key" in error_text(d), "the wrong key's 401")
    submit_key(browser, TEST_API_KEY)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the models")
    assert not browser.find_element(By.ID, "error").is_displayed()
    browser.find_element(By.ID, "prompt").send_keys("a red fox")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("2")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "img.result"), "the result")
    # The key survives a reload, in this browser only.
    browser.refresh()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the models after a reload")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == TEST_API_KEY
    assert browser.execute_script("return localStorage.getItem('imagegen.apiKey')") == TEST_API_KEY
    screenshots(browser, "playground-with-key")


def test_busy_server_shows_busy_retrying_then_gets_in(browser, keyed_server, screenshots):
    browser.get(f"{keyed_server.base_url}/")
    browser.execute_script(f"localStorage.setItem('imagegen.apiKey', '{TEST_API_KEY}')")
    browser.refresh()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the models")
    rejected = keyed_server.metric("imagegen_requests_rejected_total")
    with queue_held_full(keyed_server, {"Authorization": f"Bearer {TEST_API_KEY}"}):
        browser.find_element(By.ID, "prompt").send_keys("a red fox")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: "busy, retrying" in d.find_element(By.ID, "status").text, "busy, retrying")
        screenshots(browser, "playground-busy")
        assert keyed_server.metric("imagegen_requests_rejected_total") > rejected
        assert browser.find_elements(By.CSS_SELECTOR, "img.result") == []
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "img.result"), "the result after the retries")
    assert not browser.find_element(By.ID, "error").is_displayed()
