"""The playground at / in Debian's headless Chromium, against a real server on the demo model:
generate with live previews and progress, reuse a seed, run the page's own code snippets, edit
with a painted mask, a refused size, and a phone-sized window. Screenshots of each state are saved
under the pytest temp dir (`screenshots` fixture)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ServerProcess, assert_pixels_close
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

pytestmark = pytest.mark.slow

PROMPT = "a small yellow triangle at the top left on a black background"
# Generous: the machine is shared, and a step of the demo model may take a while there.
DEADLINE_S = 120

# Test-side instrumentation, installed in the page before it acts: every change of an image's
# class (preview -> result) and of the progress bar's value, and the form of each edit request.
RECORDER = """
window.seen = [];
new MutationObserver((changes) => {
  for (const change of changes) {
    const target = change.target;
    if (target.tagName === "IMG" && target.className) window.seen.push(target.className);
    if (target.id === "progress" && target.hasAttribute("value")) window.seen.push("step " + target.value);
  }
}).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["class", "value", "src"]});
window.sent = [];
const dataUrl = (blob) => new Promise((done) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result);
  reader.readAsDataURL(blob);
});
const original = window.fetch;
window.fetch = async (url, options = {}) => {
  const record = {url: String(url), fields: {}};
  if (options.body instanceof FormData) {
    for (const [name, value] of options.body.entries()) {
      record.fields[name] = value instanceof Blob ? await dataUrl(value) : value;
    }
  }
  window.sent.push(record);
  return original(url, options);
};
"""


@pytest.fixture(scope="module")
def server():
    server = ServerProcess("--model", "demo")
    yield server
    server.stop()


def wait(driver, condition, what: str, timeout_s: float = DEADLINE_S):
    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition, f"waited for {what}")


def open_page(driver, server) -> None:
    driver.get(f"{server.base_url}/")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), "the models from /v1/models")
    driver.execute_script(RECORDER)


def fill(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def results(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "img.result")


def pixels_of(image_element) -> np.ndarray:
    data_url = image_element.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_generate_shows_previews_and_progress_then_results_with_seeds(browser, server, screenshots, tmp_path):
    open_page(browser, server)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "demo"
    sizes = [option.get_attribute("value") for option in Select(browser.find_element(By.ID, "size")).options]
    assert sizes[0] == "64x64" and "512x512" in sizes  # the server's own list, its default first
    screenshots(browser, "playground-empty")
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    fill(browser, "n", "2")
    fill(browser, "steps", "8")
    fill(browser, "seed", "7")
    fill(browser, "partial-images", "2")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: len(results(d)) == 2, "two results")
    screenshots(browser, "playground-generated")
    assert [image.get_attribute("data-seed") for image in results(browser)] == ["7", "8"]
    seen = browser.execute_script("return window.seen")
    # Each image showed its previews in place before its result; the bar moved at every step.
    assert seen.index("preview") < seen.index("result")
    assert seen.count("preview") >= 2
    assert [entry for entry in seen if entry.startswith("step")] == [f"step {k}" for k in range(1, 9)]
    assert browser.find_element(By.ID, "status").text.startswith("Done: 2 images")
    assert not browser.find_element(By.ID, "error").is_displayed()
    first_eight = pixels_of(results(browser)[1])

    # Reuse seed 8, one image, Ctrl+Enter from the prompt: the newest result comes first.
    browser.find_elements(By.CSS_SELECTOR, "button.reuse-seed")[1].click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "8"
    fill(browser, "n", "1")
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda d: len(results(d)) == 3, "the third result")
    newest = results(browser)[0]
    assert newest.get_attribute("data-seed") == "8"
    # The same seed alone makes the image it made in a batch of two (within the documented tolerance).
    assert_pixels_close(pixels_of(newest), first_eight)

    # The card's code makes that very image: run the Python (openai) and the curl snippet.
    card = browser.find_elements(By.CSS_SELECTOR, ".card")[0]
    card.find_element(By.TAG_NAME, "summary").click()
    python = card.find_element(By.CSS_SELECTOR, "pre.python").text
    curl = card.find_element(By.CSS_SELECTOR, "pre.curl").text
    screenshots(browser, "playground-code")
    for name, command in (("python", [sys.executable, "-c", python]), ("curl", ["bash", "-c", curl])):
        folder = tmp_path / name
        folder.mkdir()
        env = {key: value for key, value in os.environ.items() if not key.startswith("OPENAI_")}
        run = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
        assert run.returncode == 0, run.stderr
        made = np.asarray(Image.open(folder / "image.png").convert("RGB"))
        assert np.array_equal(made, pixels_of(newest)), f"the {name} snippet made another image"


def test_edit_sends_the_painted_area_as_the_transparent_part_of_the_mask(browser, server, screenshots, tmp_path):
    # A picture of the demo model's own, uploaded from a file.
    open_page(browser, server)
    browser.find_element(By.ID, "prompt").send_keys("a large red circle on the left on a white background")
    fill(browser, "steps", "12")
    fill(browser, "seed", "1")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: len(results(d)) == 1, "the picture to edit")
    source = pixels_of(results(browser)[0])
    path = tmp_path / "input.png"
    Image.fromarray(source).save(path)

    browser.find_element(By.ID, "tab-edit").click()
    browser.find_element(By.ID, "image-file").send_keys(str(path))
    canvas = wait(
        browser,
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "#canvas-frame:not([hidden]) #mask-canvas")), None),
        "the canvas with the image",
    )
    browser.execute_script("document.getElementById('brush-size').value = 64")  # a range input
    width = canvas.size["width"]
    height = canvas.size["height"]
    # Strokes from top to bottom over the right half (offsets are from the canvas's centre).
    actions = ActionChains(browser)
    for x in (0.65, 0.8, 0.95):
        actions.move_to_element_with_offset(canvas, int((x - 0.5) * width), int(-0.48 * height)).click_and_hold()
        actions.move_by_offset(0, int(0.96 * height)).release()
    actions.perform()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a large red circle on the left on a black background")
    browser.execute_script(
        "const s = document.getElementById('strength'); s.value = 1; s.dispatchEvent(new Event('input'))"
    )
    screenshots(browser, "playground-edit-painted")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: len(results(d)) == 2, "the edited picture")
    screenshots(browser, "playground-edited")

    (sent,) = browser.execute_script("return window.sent.filter((r) => r.url.endsWith('/v1/images/edits'))")
    assert (sent["fields"]["strength"], sent["fields"]["stream"], sent["fields"]["seed"]) == ("1", "true", "1")
    mask = Image.open(io.BytesIO(base64.b64decode(sent["fields"]["mask"].split(",", 1)[1])))
    assert mask.size == (64, 64) and mask.mode == "RGBA"
    alpha = np.asarray(mask)[:, :, 3]
    assert set(np.unique(alpha)) == {0, 255}  # transparent = repaint, opaque = keep
    assert (alpha[:, :32] == 255).all(), "the unpainted left half is kept"
    assert (alpha[2:62, 44:62] == 0).all(), "the painted right half is repainted"
    edited = results(browser)[0]
    assert edited.get_attribute("data-seed") == "1" and pixels_of(edited).shape == (64, 64, 3)


def test_a_size_the_model_refuses_shows_the_servers_message(browser, server, screenshots):
    open_page(browser, server)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    Select(browser.find_element(By.ID, "size")).select_by_value("other")
    fill(browser, "custom-size", "65x65")
    browser.find_element(By.ID, "generate").click()
    error = wait(browser, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").text else None,
                 "the message in #error")
    screenshots(browser, "playground-bad-size")
    assert "size 65x65 is not supported" in error.text
    assert results(browser) == []
    assert browser.find_element(By.ID, "generate").is_enabled()


def test_page_is_labelled_and_fits_a_phone(browser, server, screenshots):
    browser.set_window_size(390, 844)
    open_page(browser, server)
    unlabelled = browser.execute_script(
        """return [...document.querySelectorAll("input, select, textarea")]
             .filter((c) => !c.labels.length && !c.getAttribute("aria-label")).map((c) => c.id)"""
    )
    assert unlabelled == []
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    fill(browser, "steps", "6")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: len(results(d)) == 1, "the result")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshots(browser, "playground-phone")
