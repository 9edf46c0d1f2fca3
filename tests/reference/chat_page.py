"""A real browser on the daemon's chat page: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium. Asks the capital of France and waits for the streamed
answer; checks that typed markup stays text; starts a long answer, presses Stop, and checks on
/metrics that the daemon cancelled it. Saves a screenshot. Prints what it saw as JSON.

Usage: chat_page.py BASE_URL SCREENSHOT.png
"""
import json
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, screenshot = sys.argv[1], sys.argv[2]
options = Options()
options.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,760"]:
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, 120, poll_frequency=0.1)
seen = {}


def metric(name):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def set_field(element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def ask(text):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def answers():
    return driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")


try:
    driver.get(base + "/")
    wait.until(lambda d: "idle" in d.find_element(By.ID, "state").text)
    seen["state"] = driver.find_element(By.ID, "state").text

    set_field("temperature", 0)
    set_field("max-tokens", 40)
    ask("What is the capital of France?")
    wait.until(lambda d: answers() and answers()[-1].find_elements(By.CLASS_NAME, "meta"))
    last = answers()[-1]
    seen["answer"] = last.find_element(By.CLASS_NAME, "text").text
    seen["answer_meta"] = last.find_element(By.CLASS_NAME, "meta").text
    driver.save_screenshot(screenshot)

    # Markup typed by the user (and so any the model writes, by the same path) stays text.
    driver.find_element(By.ID, "new-chat").click()
    set_field("max-tokens", 1)
    ask("<b>bold</b><img src=x onerror=\"document.title='owned'\">")
    wait.until(lambda d: answers() and answers()[-1].find_elements(By.CLASS_NAME, "meta"))
    user = driver.find_elements(By.CSS_SELECTOR, ".turn.user")[-1]
    seen["markup_text"] = user.find_element(By.CLASS_NAME, "text").text
    seen["markup_elements"] = len(driver.find_elements(By.CSS_SELECTOR, "#log b, #log img"))
    seen["title"] = driver.title

    # Stop really cancels: the daemon records a cancelled request.
    cancelled_before = metric('llama_tpu_requests_total{outcome="cancelled"}')
    driver.find_element(By.ID, "new-chat").click()
    set_field("temperature", 0.8)
    set_field("max-tokens", 3000)
    ask("Write a very long story about a dragon who learns to sail.")
    wait.until(lambda d: answers() and len(answers()[-1].find_element(By.CLASS_NAME, "text").text) > 40)
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: answers()[-1].find_elements(By.CLASS_NAME, "meta"))
    seen["stopped_meta"] = answers()[-1].find_element(By.CLASS_NAME, "meta").text
    deadline = time.time() + 30
    while metric('llama_tpu_requests_total{outcome="cancelled"}') <= cancelled_before:
        if time.time() > deadline:
            raise SystemExit("the daemon did not record the stopped request as cancelled")
        time.sleep(0.1)
    seen["cancelled"] = metric('llama_tpu_requests_total{outcome="cancelled"}') - cancelled_before
    seen["send_enabled_after_stop"] = driver.find_element(By.ID, "send").is_enabled()
finally:
    driver.quit()
print(json.dumps(seen))
