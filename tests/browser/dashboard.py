"""Drives the dashboard in headless Chromium (Selenium + chromedriver) against a running
botvisor: enters the key, creates a session through the page, sees its pairing code and
countdown, sees it turn online without a reload, stops it, and saves a screenshot.

Usage: dashboard.py URL KEY OUT_DIR   (exit 0 on success, 1 with the reason otherwise)
"""
import sys
import time

import browser_driver  # tests/browser/browser_driver.py, beside this script
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

url, key, out = sys.argv[1], sys.argv[2], sys.argv[3]

driver = browser_driver.start()
wait = WebDriverWait(driver, 20)


def row_state(user):
    # The live table is re-rendered on every event: an element can go stale mid-read.
    try:
        cells = driver.find_elements(By.CSS_SELECTOR, f'tr[data-user="{user}"] td.state')
        return cells[0].text if cells else None
    except StaleElementReferenceException:
        return None


try:
    driver.get(url)
    # The page went live: the script replaced the static table and opened the stream.
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
    driver.execute_script("window.__notReloaded = true;")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda d: "key saved" in d.find_element(By.ID, "status").text)
    driver.find_element(By.ID, "new-user").send_keys("browser_bot")
    driver.find_element(By.ID, "new-phone").send_keys("15550001234")
    driver.find_element(By.ID, "create").click()
    code = wait.until(EC.visibility_of_element_located((By.ID, "pairing-code")))
    wait.until(lambda d: len(code.text) == 9 and code.text[4] == "-")
    expiry = driver.find_element(By.ID, "pairing-expiry").text
    assert expiry.startswith("expires in "), expiry
    first = expiry
    time.sleep(1.5)
    second = driver.find_element(By.ID, "pairing-expiry").text
    assert second != first or "paired" in second, f"countdown stuck at {first!r}"
    print(f"pairing code shown: {code.text} ({first} -> {second})")
    driver.save_screenshot(f"{out}/dashboard-pairing.png")
    # The simulated phone pairs: the row turns online, without a reload.
    wait.until(lambda d: row_state("browser_bot") == "online")
    assert driver.execute_script("return window.__notReloaded === true"), "the page reloaded"
    wait.until(lambda d: "paired" in d.find_element(By.ID, "pairing-expiry").text)
    driver.save_screenshot(f"{out}/dashboard.png")
    wait.until(EC.element_to_be_clickable(
        (By.CSS_SELECTOR, 'tr[data-user="browser_bot"] button[data-action="stop"]'))).click()
    wait.until(lambda d: row_state("browser_bot") == "stopped")
    # The stream's event can redraw the row before the stop's own answer reaches the
    # status line: wait for that answer rather than read the line once.
    try:
        wait.until(lambda d: "stopped" in d.find_element(By.ID, "status").text)
    except Exception:
        raise AssertionError(driver.find_element(By.ID, "status").text)
    # User text is shown as text, never run as markup.
    names = driver.execute_script(
        "return [...document.querySelectorAll('td.user')].map(td => td.innerHTML)")
    assert all("<" not in n for n in names), names
    print("dashboard: created, saw code and countdown, went online live, stopped")
except Exception as e:  # noqa: BLE001 - report anything, with a screenshot
    driver.save_screenshot(f"{out}/dashboard-failure.png")
    print(f"browser check failed: {e!r}", file=sys.stderr)
    print(driver.get_log("browser") if hasattr(driver, "get_log") else "", file=sys.stderr)
    driver.quit()
    sys.exit(1)
driver.quit()
