"""The operator's view inside the real Airflow UI, in headless Chromium: signed in with the printed login, the
"mlpipe" navigation entry opens the view in the UI's frame (the relative ``href`` resolves against the UI's
base, the UI's cookie signs the frame in), and the audit form there answers. Uses the shared stack and the
browser fixture of ``test_ui_chromium`` (skips, saying why, without Chromium, its driver or selenium)."""

from __future__ import annotations

import pytest

from tests.e2e.test_ui_chromium import _body, _click_button, _set, _wait, browser  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_the_mlpipe_view_opens_in_the_ui_and_audits(airflow_stack, browser):  # noqa: F811 - the fixture
    from selenium.webdriver.common.by import By

    af, driver = airflow_stack, browser
    driver.get(af.url + "/")
    _wait(lambda: "/auth/login" in driver.current_url, 30, "the login page")
    _set(driver, "username", "admin")
    _set(driver, "password", af.password)
    _click_button(driver, "Sign in")
    _wait(lambda: "/auth/login" not in driver.current_url, 30, "the login to finish")

    driver.get(af.url + "/plugin/mlpipe")
    frame = _wait(lambda: driver.find_elements(By.TAG_NAME, "iframe"), 30, "the view's frame")[0]
    src = frame.get_attribute("src")
    assert src.rstrip("/").endswith("/mlpipe"), src
    driver.switch_to.frame(frame)
    _wait(lambda: "What happened at" in _body(driver) or "No model has been registered yet" in _body(driver), 30,
          "the operator's view in the frame")
    driver.get(src.rstrip("/") + "/audit")  # the audit form, as the frame's link opens it
    _set(driver, "at", "2026-11-24 03:47")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(lambda: "What happened at 2026-11-24T03:47:00+00:00" in _body(driver), 60, "the audit answer")
    assert "Nothing was recorded in this window" in _body(driver)
