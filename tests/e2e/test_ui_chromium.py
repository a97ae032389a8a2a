"""The real Airflow UI in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium):
log in with the printed login, open the ``retrain`` DAG, see the typed form with its descriptions, get an
invalid value refused with a clear message, trigger a run with params and watch it succeed.

Skips, saying why, when Chromium, its driver or the selenium package is not installed
(``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent: apt-get install -y chromium chromium-driver"
    if not Path(CHROMEDRIVER).exists():
        return "chromedriver is absent: apt-get install -y chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed in the venv"
    return None


@pytest.fixture
def browser(tmp_path):
    reason = _skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.implicitly_wait(10)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(tmp_path / "last.png"))
        driver.quit()


def _click_button(driver, text: str) -> None:
    """Click the visible button labelled ``text`` (looked up again if React re-renders it meanwhile)."""
    from selenium.webdriver.common.by import By

    def click() -> bool:
        buttons = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == text and b.is_displayed()]
        if not buttons:
            return False
        buttons[0].click()
        return True

    _wait(click, 30, f"a {text!r} button on {driver.current_url}")


def _submit(driver) -> None:
    """The trigger form's own Trigger button (scrolled into view; a toast may cover it)."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By

    def click() -> bool:
        button = driver.find_element(By.CSS_SELECTOR, "[data-testid='trigger-dag-submit']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        try:
            button.click()
        except ElementClickInterceptedException:
            driver.execute_script("arguments[0].click();", button)
        return True

    _wait(click, 30, "the trigger form's submit button")


def _set(driver, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def fill() -> bool:
        field = driver.find_element(By.NAME, name)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(value)
        return driver.find_element(By.NAME, name).get_attribute("value") == value

    _wait(fill, 30, f"the field {name} to hold {value!r}")


def _body(driver) -> str:
    from selenium.webdriver.common.by import By

    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except StaleElementReferenceException:  # the page re-rendered while it was read: read it next time
        return ""


def _wait(check, timeout: float, what: str, interval: float = 0.5):
    """Poll ``check`` until it returns something true. The React UI re-renders often: an element that went
    stale (or is not there yet) between finding and using it counts as "not yet", and is looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (StaleElementReferenceException, NoSuchElementException) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last: {last.msg})" if last else ""))


def test_trigger_retrain_from_the_ui_with_params(airflow_stack, browser):
    import sys

    from selenium.webdriver.common.by import By

    from tasks.steps import drops

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    import mlpipe_triggers

    af, client, driver = airflow_stack, airflow_stack.client, browser
    # A valid drop, claimed first so the watcher leaves it to this manual run.
    drops.make_drop(af.store, "ui-drop", size=150, seed=71, complete=False)
    mlpipe_triggers.claim(af.store, "ui-drop", by_run="test_ui_chromium")
    drops.make_drop(af.store, "ui-drop", size=150, seed=71)
    for run in client.dag_runs("retrain"):  # runs left queued by other tests would go first
        if run["state"] in ("queued", "running"):
            client.request("PATCH", f"/api/v2/dags/retrain/dagRuns/{run['dag_run_id']}", json={"state": "failed"})
    before = {r["dag_run_id"] for r in client.dag_runs("retrain")}

    # Log in with the login `make up` prints.
    driver.get(af.url + "/")
    _wait(lambda: "/auth/login" in driver.current_url, 30, "the login page")
    _set(driver, "username", "admin")
    _set(driver, "password", af.password)
    _click_button(driver, "Sign in")
    _wait(lambda: "/auth/login" not in driver.current_url, 30, "the login to finish")

    # Open the DAG and its trigger form: typed fields with their descriptions.
    driver.get(af.url + "/dags/retrain")
    _click_button(driver, "Trigger")
    _wait(lambda: driver.find_elements(By.NAME, "element_epochs"), 30, "the trigger form")
    text = _body(driver)
    assert "Trigger Dag - retrain" in text
    for words in ("The data drop to train on", "Maximum training epochs", "Random seed", "Extra drops"):
        assert words in text, words

    # An invalid value is refused with a clear message; no run starts.
    _set(driver, "element_drop_id", "bad/id")
    _set(driver, "element_epochs", "1")
    _submit(driver)
    _wait(lambda: "Invalid input for param drop_id: 'bad/id' does not match" in _body(driver), 30,
          "the refusal of drop_id 'bad/id'")
    assert {r["dag_run_id"] for r in client.dag_runs("retrain")} == before

    # Valid params: the run starts, and the UI shows it succeed.
    client.set_paused("retrain", False)
    try:
        _set(driver, "element_drop_id", "ui-drop")
        _submit(driver)
        _wait(lambda: "/dags/retrain/runs/" in driver.current_url, 30, "the new run's page")
        run_id = driver.current_url.rsplit("/runs/", 1)[1].split("?")[0]
        from urllib.parse import unquote

        run = client.dag_run("retrain", unquote(run_id))
        assert run["conf"]["drop_id"] == "ui-drop" and run["conf"]["epochs"] == 1
        assert run["run_type"] == "manual"

        def finished() -> bool:
            return client.dag_run("retrain", unquote(run_id))["state"] in ("success", "failed")

        # 150 images and 1 epoch: the pipeline runs through, and QC may reject the model. Either the run
        # deploys (success), or its final `outcome` task fails saying REJECTED, visibly not a deploy.
        _wait(finished, 300, "the retrain run to finish", interval=3)
        state = client.dag_run("retrain", unquote(run_id))["state"]
        states = client.task_instances("retrain", unquote(run_id))
        assert all(states[t] == "success" for t in ("validate", "train", "register", "compile", "qc", "qc_gate")), \
            states
        if state == "success":
            assert states["deploy"] == "success" and states["outcome"] == "success", states
        else:
            assert states["deploy"] == "skipped" and states["outcome"] == "failed", states
        driver.refresh()
        shown = "Success" if state == "success" else "Failed"
        _wait(lambda: shown.lower() in _body(driver).lower(), 30, f"the UI to show the run's state ({shown})")
    finally:
        client.set_paused("retrain", True)
