"""serve.py's chat page (serve.html) in a real headless browser (Debian's chromium driven by
Selenium through /usr/bin/chromedriver; .ci/run installs both): a question typed in, the reply
streamed into the page, the conversation kept for the next question. A screenshot is kept in
tmp_path."""
import shutil

import httpx
import pytest

import chat
from test_serve import Server, tiny_model, write_checkpoint

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which(CHROMEDRIVER) is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver)")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=900,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_chat_page_streams_replies_and_keeps_the_conversation(tmp_path, browser):
    """Two questions typed into the page: each reply, streamed in several pieces, is the text
    the API gives for the whole conversation so far (greedy, so it is one text)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server("--init-from", write_checkpoint(tmp_path / "chat.pt", tiny_model(),
                                                    chat.FORMAT))
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.ID, "model").text == "chat")  # from /v1/models
        for field, value in (("temperature", "0"), ("max-tokens", "24")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        # Count the changes to the conversation's text: a streamed reply makes several.
        browser.execute_script("window.updates = 0; new MutationObserver(() => window.updates++)"
                               ".observe(document.getElementById('log'), {subtree: true, "
                               "childList: true, characterData: true});")
        messages = []
        for turn, question in enumerate(["What is a cat?", "And a dog?"]):
            browser.find_element(By.ID, "question").send_keys(question, Keys.ENTER)
            WebDriverWait(browser, 60).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant.done")) == turn + 1)
            shown = browser.execute_script(
                "return document.querySelectorAll('.assistant.done')[arguments[0]].textContent",
                turn)
            messages.append({"role": "user", "content": question})
            expected = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "messages": messages, "temperature": 0, "max_tokens": 24}).json()
            reply = expected["choices"][0]["message"]["content"]
            assert reply.strip() and shown == reply
            messages.append({"role": "assistant", "content": reply})
        alone = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": messages[2:3], "temperature": 0, "max_tokens": 24}).json()
        assert alone["choices"][0]["message"]["content"] != reply  # the history mattered
        assert browser.execute_script("return window.updates") > 6  # not one piece per reply
        assert "error" not in browser.find_element(By.ID, "log").get_attribute("innerHTML")
        screenshot = tmp_path / "chat.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 1000
        assert server.health() == {"status": "ok", "active": 0, "waiting": 0}
    finally:
        server.stop()
