"""The headless Chromium both dashboard checks drive (Selenium + chromedriver)."""
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def start():
    """A headless Chromium with a profile of its own, as the project runs it."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        f"--user-data-dir={tempfile.mkdtemp()}",
    ]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
