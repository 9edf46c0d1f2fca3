"""A real browser on the daemon's chat page: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium, against a daemon started with --queue-depth 1. Prints
what it saw as JSON for the Rust test to judge.

- Asks the capital of France and waits for the streamed answer; a reload keeps the chat and
  the settings.
- Typed markup stays text.
- Markdown from a stored conversation (the page's localStorage format): a fenced code block
  as <pre><code> (also an unclosed fence), lists, bold, a safe link; model markup stays text;
  Copy buttons copy the code and the answer; at phone width the long code line scrolls
  inside its block, not the page.
- The system prompt is sent first and kept; a conversation too long for the context loses its
  oldest turn in the daemon (drop_old_turns) and so in the page.
- A turn refused with 503 busy (two long streams hold the engine and the one queue place)
  shows its error and Retry, is not sent with the next question, and Retry asks it again.
- Stop cancels the generation (/metrics counts it); a page left during an answer offers that
  question for Retry when reopened.
- Screenshots at 1200 and 400 px wide of a conversation with a code block.

Usage: chat_page.py BASE_URL WIDE.png PHONE.png
"""
import json
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

base, wide_shot, phone_shot = sys.argv[1], sys.argv[2], sys.argv[3]
options = Options()
options.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,800"]:
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, 120, poll_frequency=0.1)
seen = {}

CODE = 'print("Hello, world!")'
LONG_LINE = "numbers = [" + ", ".join(str(i) for i in range(60)) + "]"
STORED_ANSWER = f"""### Hello in Python

Save this as `hello.py`:

```python
{CODE}
{LONG_LINE}
```

Then:

1. run **python3 hello.py**
2. read *the* output
   - it says hello

See [the docs](https://docs.python.org/3/) (not [this](javascript:alert(1))).
<b>bold</b><img src=x onerror="document.title='owned'">"""
# The page's localStorage format, as a test and a reader of the page see it.
STORED = {
    "settings": {"temperature": 0, "max_tokens": 40, "system": ""},
    "messages": [
        {"role": "user", "content": "How do I print hello in Python?"},
        {"role": "assistant", "content": STORED_ANSWER, "meta": "first token 100 ms · 40.0 tokens/s · 60 tokens · stop (eos)"},
        {"role": "user", "content": "And in JavaScript?"},
        {"role": "assistant", "content": "Like this:\n\n```js\nconsole.log(", "meta": "stopped"},
    ],
}
FILLER = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(80))


def health():
    return json.load(urllib.request.urlopen(base + "/health", timeout=30))


def metric(name):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def until(what, condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.05)


def settings_open():
    if not driver.find_element(By.ID, "settings").is_displayed():
        driver.find_element(By.ID, "settings-toggle").click()


def set_field(element_id, value):
    settings_open()
    field = driver.find_element(By.ID, element_id)
    field.send_keys(Keys.CONTROL + "a", Keys.DELETE)
    if value != "":
        field.send_keys(str(value))


def ask(text):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def answers():
    return driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")


def answered():
    """Waits until the last answer has its meta line (the page adds it when the answer ends)."""
    wait.until(lambda d: answers() and answers()[-1].find_elements(By.CLASS_NAME, "meta"))
    return answers()[-1]


def turns():
    return [t.find_element(By.CLASS_NAME, "text").text for t in driver.find_elements(By.CSS_SELECTOR, "#log .turn")]


def metas():
    return [m.text for m in driver.find_elements(By.CSS_SELECTOR, "#log .meta")]


def stored():
    return json.loads(driver.execute_script("return localStorage.getItem('llama-tpu-chat')") or "null")


def reload():
    driver.refresh()
    wait.until(lambda d: d.find_element(By.ID, "state").text != "connecting...")


def store(chat):
    driver.execute_script("localStorage.setItem('llama-tpu-chat', arguments[0])", json.dumps(chat))
    reload()


def record_requests():
    """From now on the page's POST bodies are kept in window.sent."""
    driver.execute_script(
        """window.sent = [];
        const fetch = window.fetch;
        window.fetch = function (url, init) {
          if (init && init.body) window.sent.push(JSON.parse(init.body));
          return fetch.apply(this, arguments);
        };"""
    )


def sent():
    return driver.execute_script("return window.sent")


def overflow():
    """How far the page is wider than the window (0: nothing to scroll sideways)."""
    return driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")


class LongStream:
    """A long streamed completion on a raw socket, read (and dropped) by a thread so the daemon
    never waits on it; close() leaves, which cancels it."""

    def __init__(self):
        url = urllib.parse.urlsplit(base)
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "temperature": 0.8})
        self.sock = socket.create_connection((url.hostname, url.port))
        self.sock.sendall(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        threading.Thread(target=self.drain, daemon=True).start()

    def drain(self):
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


try:
    driver.get(base + "/")
    wait.until(lambda d: "idle" in d.find_element(By.ID, "state").text)
    seen["state"] = driver.find_element(By.ID, "state").text

    # A real question; the reload keeps the turns, their meta lines and the settings.
    set_field("temperature", 0)
    set_field("max-tokens", 40)
    ask("What is the capital of France?")
    last = answered()
    seen["answer"] = last.find_element(By.CLASS_NAME, "text").text
    seen["answer_meta"] = last.find_element(By.CLASS_NAME, "meta").text
    before = (turns(), metas())
    reload()
    seen["reload_keeps_chat"] = (turns(), metas()) == before and len(before[0]) == 2
    seen["reload_keeps_settings"] = [
        driver.find_element(By.ID, i).get_attribute("value") for i in ["temperature", "max-tokens"]
    ]

    # Markup typed by the user stays text.
    driver.find_element(By.ID, "new-chat").click()
    seen["new_chat_clears"] = stored()["messages"] == [] and turns() == []
    set_field("max-tokens", 1)
    ask("<b>bold</b><img src=x onerror=\"document.title='owned'\">")
    answered()
    user = driver.find_elements(By.CSS_SELECTOR, ".turn.user")[-1]
    seen["markup_text"] = user.find_element(By.CLASS_NAME, "text").text
    seen["markup_elements"] = len(driver.find_elements(By.CSS_SELECTOR, "#log b, #log img"))
    seen["title"] = driver.title

    # Markdown, from a conversation put into storage (so the text is known), after a reload.
    store(STORED)
    seen["stored_turns"] = len(turns())
    blocks = driver.find_elements(By.CSS_SELECTOR, "#log pre code")
    seen["code_blocks"] = [b.get_attribute("textContent") for b in blocks]
    seen["code_copy_buttons"] = len(driver.find_elements(By.CSS_SELECTOR, "#log .code button"))
    seen["answer_copy_buttons"] = len(driver.find_elements(By.CSS_SELECTOR, "#log .foot button"))
    seen["markdown"] = {
        tag: len(driver.find_elements(By.CSS_SELECTOR, "#log .assistant " + tag))
        for tag in ["h3", "ol > li", "li ul > li", "strong", "em", "p code"]
    }
    seen["links"] = [
        [a.get_attribute("href"), a.get_attribute("rel"), a.get_attribute("target")]
        for a in driver.find_elements(By.CSS_SELECTOR, "#log a")
    ]
    seen["stored_markup_elements"] = len(driver.find_elements(By.CSS_SELECTOR, "#log b, #log img"))
    seen["stored_title"] = driver.title
    # Copy: a code block's code, an answer's Markdown source (the clipboard itself is out of
    # reach in headless Chromium: the page's calls are recorded instead).
    driver.execute_script(
        "window.copied = []; navigator.clipboard.writeText = (t) => { copied.push(t); return Promise.resolve(); }"
    )
    driver.find_element(By.CSS_SELECTOR, "#log .code button").click()
    driver.find_element(By.CSS_SELECTOR, "#log .foot button").click()
    wait.until(lambda d: len(d.execute_script("return window.copied")) == 2)
    seen["copied"] = driver.execute_script("return window.copied")
    seen["copy_label"] = driver.find_element(By.CSS_SELECTOR, "#log .foot button").text
    driver.set_window_size(400, 800)
    reload()
    seen["phone_width"] = driver.execute_script("return window.innerWidth")
    seen["phone_overflow"] = overflow()
    seen["phone_code_scrolls"] = driver.execute_script(
        "const p = document.querySelector('#log pre'); return p.scrollWidth > p.clientWidth"
    )
    seen["phone_settings_folded"] = not driver.find_element(By.ID, "settings").is_displayed()
    driver.set_window_size(1200, 800)
    reload()

    # The system prompt goes first; a chat too long for the context loses its oldest turn.
    store(
        {
            "settings": {"temperature": 0, "max_tokens": 2048, "system": ""},
            "messages": [
                {"role": "user", "content": "Remember this text. " + FILLER},
                {"role": "assistant", "content": FILLER, "meta": "old"},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "2+2 is 4.", "meta": "old"},
            ],
        }
    )
    set_field("system", "You are a helpful assistant.")
    record_requests()
    ask("Say hello.")
    last = answered()
    body = sent()[-1]
    seen["system_first"] = body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    seen["drop_old_turns_sent"] = body.get("drop_old_turns")
    seen["dropped_meta"] = last.find_element(By.CLASS_NAME, "meta").text
    seen["after_drop_stored"] = [m["content"][:20] for m in stored()["messages"]]
    seen["after_drop_turns"] = len(turns())
    reload()
    seen["system_kept"] = driver.find_element(By.ID, "system").get_attribute("value")
    set_field("system", "")
    seen["system_cleared"] = stored()["settings"]["system"] == ""

    # A full queue: the page's question gets 503 busy; it shows the error and Retry, it is not
    # sent again with the next question, and Retry asks it again.
    driver.find_element(By.ID, "new-chat").click()
    set_field("max-tokens", 40)
    holders = [LongStream()]
    until("the first stream to run", lambda: health()["busy"])
    holders.append(LongStream())
    until("the second stream to wait", lambda: health()["queue_depth"] == 1)
    ask("What is the capital of Spain?")
    failed = answered()
    seen["busy_meta"] = failed.find_element(By.CLASS_NAME, "meta").text
    seen["busy_retry_buttons"] = len(failed.find_elements(By.CLASS_NAME, "retry"))
    seen["busy_failed_turns"] = len(driver.find_elements(By.CSS_SELECTOR, "#log .turn.failed"))
    for h in reversed(holders):
        h.close()
    until("the daemon to be idle", lambda: not health()["busy"] and health()["queue_depth"] == 0)
    record_requests()
    ask("What is the capital of Italy?")
    wait.until(lambda d: len(answers()) == 2 and answers()[-1].find_elements(By.CLASS_NAME, "meta"))
    seen["after_busy_sent"] = [m["content"] for m in sent()[-1]["messages"]]
    seen["after_busy_answer"] = answers()[-1].find_element(By.CLASS_NAME, "text").text
    driver.find_element(By.CSS_SELECTOR, "#log .retry").click()
    wait.until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "#log .turn.failed")
        and len(answers()) == 2
        and answers()[-1].find_elements(By.CLASS_NAME, "meta")
    )
    seen["retry_sent"] = [m["content"] for m in sent()[-1]["messages"]]
    seen["retry_answer"] = answers()[-1].find_element(By.CLASS_NAME, "text").text
    seen["retry_meta"] = answers()[-1].find_element(By.CLASS_NAME, "meta").text
    seen["retry_turns"] = turns()

    # Stop really cancels: the daemon records a cancelled request.
    cancelled_before = metric('llama_tpu_requests_total{outcome="cancelled"}')
    driver.find_element(By.ID, "new-chat").click()
    set_field("temperature", 0.8)
    set_field("max-tokens", 3000)
    ask("Write a very long story about a dragon who learns to sail.")
    wait.until(lambda d: answers() and len(answers()[-1].find_element(By.CLASS_NAME, "text").text) > 40)
    driver.find_element(By.ID, "stop").click()
    seen["stopped_meta"] = answered().find_element(By.CLASS_NAME, "meta").text
    until(
        "the daemon to count the stopped request as cancelled",
        lambda: metric('llama_tpu_requests_total{outcome="cancelled"}') > cancelled_before,
        30,
    )
    seen["cancelled"] = metric('llama_tpu_requests_total{outcome="cancelled"}') - cancelled_before
    seen["send_enabled_after_stop"] = driver.find_element(By.ID, "send").is_enabled()

    # A page left during an answer: reopened, it offers that question for Retry.
    driver.find_element(By.ID, "new-chat").click()
    ask("Write a very long story about a dragon who learns to sail.")
    wait.until(lambda d: answers() and len(answers()[-1].find_element(By.CLASS_NAME, "text").text) > 40)
    reload()
    seen["left_meta"] = answered().find_element(By.CLASS_NAME, "meta").text
    seen["left_retry_buttons"] = len(driver.find_elements(By.CSS_SELECTOR, "#log .retry"))
    seen["left_stored_failed"] = [m.get("failed") for m in stored()["messages"]]
    until("the daemon to be idle", lambda: not health()["busy"] and health()["queue_depth"] == 0)

    # Screenshots of a real conversation with code, wide and at phone width.
    driver.find_element(By.ID, "new-chat").click()
    set_field("temperature", 0)
    set_field("max-tokens", 300)
    ask("What is the capital of France?")
    answered()
    ask("Write a Python function that reverses a string.")
    wait.until(lambda d: len(answers()) == 2 and answers()[-1].find_elements(By.CLASS_NAME, "meta"))
    seen["screenshot_code_blocks"] = len(driver.find_elements(By.CSS_SELECTOR, "#log pre code"))
    driver.execute_script("document.getElementById('log').scrollTop = 1e9")
    driver.save_screenshot(wide_shot)
    driver.set_window_size(400, 800)
    reload()
    driver.execute_script("document.querySelector('#log pre').scrollIntoView({block: 'center'})")
    seen["screenshot_phone_overflow"] = overflow()
    driver.save_screenshot(phone_shot)
except BaseException:
    print(json.dumps(seen), file=sys.stderr)
    try:
        print("turns:", turns(), metas(), file=sys.stderr)
    except Exception:
        pass
    raise
finally:
    driver.quit()
print(json.dumps(seen))
