"""Drives the dashboard in headless Chromium with a scoped API key: the page shows only the
sessions that key may see, and the live stream adds none of the others.

Usage: scoped.py URL KEY OUT_DIR ADMIN_KEY   (exit 0 on success, 1 with the reason otherwise)
"""
import json
import sys
import time
import urllib.request

import browser_driver  # tests/browser/browser_driver.py, beside this script
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, key, out, admin = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

driver = browser_driver.start()
wait = WebDriverWait(driver, 20)


def users():
    # The live table is re-rendered on every event: an element can go stale mid-read.
    try:
        return sorted(td.text for td in driver.find_elements(By.CSS_SELECTOR, "td.user"))
    except StaleElementReferenceException:
        return None


def admin_post(path):
    req = urllib.request.Request(url.rstrip("/") + path, method="POST",
                                 headers={"X-API-Key": admin})
    return json.load(urllib.request.urlopen(req))


try:
    driver.get(url)
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
    # Reads are open: before a key, the page shows every session.
    wait.until(lambda d: users() == ["other_1", "shop_1"])
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda d: "key saved" in d.find_element(By.ID, "status").text)
    # With the shop's key, only the shop's session.
    wait.until(lambda d: users() == ["shop_1"])
    # A change to another tenant's session does not reach this page.
    admin_post("/api/sessions/other_1/stop")
    admin_post("/api/sessions/shop_1/stop")
    wait.until(lambda d: d.find_elements(
        By.CSS_SELECTOR, 'tr[data-user="shop_1"].stopped'))
    time.sleep(0.5)
    seen = None
    for _ in range(10):  # a redraw mid-read gives None: read again
        seen = users()
        if seen is not None:
            break
        time.sleep(0.1)
    assert seen == ["shop_1"], seen
    driver.save_screenshot(f"{out}/dashboard-scoped.png")
    print("dashboard with a scoped key: shows shop_1 only, live")
except Exception as e:  # noqa: BLE001 - report anything, with a screenshot
    driver.save_screenshot(f"{out}/dashboard-scoped-failure.png")
    print(f"browser check failed: {e!r}", file=sys.stderr)
    driver.quit()
    sys.exit(1)
driver.quit()
