"""GET /docs in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): the page loads
from the app alone with no console error, lists /predict, and "Try it out" of the example record gets a prediction.

The screenshot of the answered request is written to test-artifacts/docs-page.png (path printed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest
from selenium import webdriver
from selenium.common.exceptions import JavascriptException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as visible
from selenium.webdriver.support.wait import WebDriverWait

from serving.docs import CONTENT_SECURITY_POLICY
from serving.schema import EXAMPLE_RECORD
from tests.conftest import RIDGE
from tests.registry import fitted, temporary_registry
from tests.servers import ROOT, ServerProcess, running_app, serve_environment

pytestmark = [
    pytest.mark.integration,  # a uvicorn process and a browser
    pytest.mark.filterwarnings("ignore:Operation with range is deprecated"),  # inside MLflow, logging the model
]

ARTIFACTS = ROOT / "test-artifacts"
WAIT_S = 60  # the page and its 1.5 MB script on a busy machine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """serve.py on a ridge model copied out of a temporary registry into a local directory (MODEL_URI): the page
    needs a model, not a registry."""
    tmp = tmp_path_factory.mktemp("docs")
    with temporary_registry(tmp) as registry:
        version = registry.register("docs", fitted(RIDGE))
        model = mlflow.artifacts.download_artifacts(f"models:/docs/{version}", dst_path=str(tmp / "model"))
    env = serve_environment(MLFLOW_TRACKING_URI=registry.uri, MODEL_URI=model,
                            PREDICTION_LOG_DIR=str(tmp / "predictions"))
    with running_app(env, tmp / "serve.log") as server:
        yield server


def debian_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make tools`, or as root "
                    "`apt-get install -y --no-install-recommends chromium chromium-driver`")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium that keeps its console and network log. Selenium is given both binaries, so it downloads
    nothing (Selenium Manager stays offline)."""
    options = webdriver.ChromeOptions()
    options.binary_location = debian_tool("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1800",
                     "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(debian_tool("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_docs(browser: WebDriver, server: ServerProcess) -> WebElement:
    """Load /docs afresh (logs emptied first) and return the POST /predict operation once Swagger UI drew it."""
    browser.get_log("browser")
    browser.get_log("performance")
    browser.get(server.url + "/docs")
    return WebDriverWait(browser, WAIT_S).until(
        visible.visibility_of_element_located((By.CSS_SELECTOR, ".opblock-post[id$='_predict']")))


def console_errors(browser: WebDriver) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def requested_urls(browser: WebDriver) -> set[str]:
    urls = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def test_openapi_document_carries_the_example_record_and_each_example_is_answered(server):
    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    examples = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert next(iter(examples.values()))["value"] == EXAMPLE_RECORD  # the first is the one "Try it out" shows
    for example in examples.values():
        assert httpx.post(server.url + "/predict", json=example["value"], timeout=10).status_code == 200


def test_docs_page_lists_every_endpoint_from_this_server_alone_without_console_errors(browser, server):
    open_docs(browser, server)
    listed = {(element.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
               element.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
              for element in browser.find_elements(By.CSS_SELECTOR, ".opblock")}

    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert listed == {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert ("POST", "/predict") in listed and ("POST", "/invocations") in listed
    assert browser.title == "California housing price regressor: API"
    assert console_errors(browser) == []
    requested = requested_urls(browser)
    assert server.url + "/openapi.json" in requested
    assert {url for url in requested if not url.startswith(server.url + "/")} <= {"about:blank"}  # no CDN


def test_try_it_out_with_the_example_record_answers_200_with_a_prediction(browser, server, capsys):
    operation = open_docs(browser, server)
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    WebDriverWait(browser, WAIT_S).until(
        visible.element_to_be_clickable((By.CSS_SELECTOR, ".opblock-post .try-out__btn"))).click()
    body = WebDriverWait(browser, WAIT_S).until(
        visible.visibility_of_element_located((By.CSS_SELECTOR, ".opblock-post textarea.body-param__text")))
    assert json.loads(body.get_attribute("value") or "") == EXAMPLE_RECORD

    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = WebDriverWait(browser, WAIT_S).until(visible.visibility_of_element_located(
        (By.CSS_SELECTOR, ".opblock-post .live-responses-table .response .response-col_status")))
    answer = json.loads(operation.find_element(
        By.CSS_SELECTOR, ".live-responses-table .response-col_description pre.microlight").text)
    browser.execute_script("arguments[0].scrollIntoView()", operation)
    screenshot = save_screenshot(browser)

    assert status.text == "200"
    expected = httpx.post(server.url + "/predict", json=EXAMPLE_RECORD, timeout=10).json()
    assert answer.pop("id") != expected.pop("id")  # each request's own
    assert answer == expected  # the prediction, and the model that made it
    assert console_errors(browser) == []
    with capsys.disabled():  # shown without -s
        print(f"\ndocs page screenshot: {screenshot}")


def test_page_policy_refuses_inline_script(browser, server):
    open_docs(browser, server)
    response = httpx.get(server.url + "/docs", timeout=10)
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "<script>" not in response.text  # every script is a file the policy allows

    browser.execute_script("const script = document.createElement('script');"
                           "script.textContent = 'window.injected = true';"
                           "document.head.appendChild(script);")
    with pytest.raises(JavascriptException):
        browser.execute_script("if (!window.injected) { throw new Error('inline script blocked'); }")
    assert any("Content Security Policy" in message for message in console_errors(browser))


def save_screenshot(browser: WebDriver) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "docs-page.png"
    assert browser.save_screenshot(str(path)), "Chromium took no screenshot"
    return path
