"""The processor's status page in a real browser, for the tests that look at it
(tests/interop/test_status_page.py, tests/compose): Debian's Chromium, headless, driven through
its ChromeDriver by Selenium."""

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from support import wait_for


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # no network but loopback here: nothing in the background, no component updates
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1400"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


# The page redraws its cards and tables at every poll (2 s): an element found by one WebDriver
# call can be gone by the next (StaleElementReferenceException, seen in CI). So each read below
# is one script, which runs between two redraws.
def text(driver, css):
    return driver.execute_script("return document.querySelector(arguments[0]).innerText.trim();", css)


def rows(driver, css):
    """The text of each cell of each row matched by `css`, read at once."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(r => [...r.querySelectorAll('td')].map(td => td.innerText.trim()));", css)


def clipped(driver):
    """The tables wider than the card that holds them: their right edge is cut off."""
    return driver.execute_script(
        "return [...document.querySelectorAll('table')]"
        ".filter(t => t.scrollWidth > t.parentElement.clientWidth + 1).map(t => t.id);")


def card(driver, key):
    return text(driver, f'.card[data-key="{key}"] .value').replace("$", "").replace(",", "")


def loaded(driver):
    """The page has drawn its first answer."""
    return driver.execute_script("return document.body.getAttribute('data-loaded') === 'true';")


def trace_links(driver):
    """The recent dead letters' trace ids and where each links."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#recent tbody a')]"
        ".map(a => [a.innerText.trim(), a.getAttribute('href')]));")


def check_final_figures(driver, port, stats, report, screenshot):
    """Opens the status page at http://localhost:`port`/ as a person would, waits until it shows
    the group's `stats` (/stats/global) and the analyzer's `report` (/report), checks that it
    shows no error, cuts no table off and counts the dead letters by kind as the report does,
    keeps a screenshot, and returns the recent dead letters' trace links."""
    driver.get(f"http://localhost:{port}/")
    wait_for("the page's first answer", lambda: loaded(driver), 30)
    wait_for("the page to show the final figures", lambda: (
        int(card(driver, "processed")) == stats["processed"]
        and text(driver, "#dead-total").replace(",", "") == str(report["total"])), 30)
    assert text(driver, "#dead-error") == "" and text(driver, "#global-error") == ""
    assert clipped(driver) == [], "cut off at their right edge"
    assert {row[0]: int(row[1]) for row in rows(driver, "#kinds tbody tr")} == report["by_kind"]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    return trace_links(driver)
