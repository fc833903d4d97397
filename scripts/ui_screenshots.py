"""Save PNG screenshots of the local Prefect UI: what a user sees of the `nightly` deployment,
its newest finished run and the artifacts. `make screenshots`, or:

    python scripts/ui_screenshots.py [--ui http://127.0.0.1:4200] [--out DIR]

Needs Debian's browser: apt-get install -y chromium chromium-driver
"""
import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName,
                                            FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterState,
                                            FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
from prefect.exceptions import ObjectNotFound
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FIX_BROWSER = "apt-get update && apt-get install -y chromium chromium-driver"
FINISHED = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]


def fail(message: str) -> None:
    sys.exit(f"ui_screenshots: {message}")


def browser() -> webdriver.Chrome:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            fail(f"{path} is missing; install it with: {FIX_BROWSER}")
    options = webdriver.ChromeOptions()
    # Both paths explicit: Selenium Manager then never runs (it would try to download a browser).
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1600,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        fail(f"chromium did not start ({exc.msg}); reinstall it with: {FIX_BROWSER}")
    # --window-size includes the (invisible) browser frame; this makes the page itself 1600x1000.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    return driver


def shoot(driver, url: str, expect: str, path: Path, tab: str | None = None) -> None:
    """Open `url`, wait until the page shows `expect`, click `tab` if given, save as `path`."""
    driver.get(url)
    wait = WebDriverWait(driver, 30, poll_frequency=0.5)
    # The UI is a Vue app: the HTML is ready long before the data, so wait for a text that only
    # the loaded data produces, then a little longer for the rest of the page (charts, panels).
    try:
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete"
                   and expect in d.find_element(By.TAG_NAME, "body").text)
        if tab:
            # Clicked, not `?tab=`: the run page drops that while its tabs are still hidden.
            element = wait.until(lambda d: d.find_element(
                By.XPATH, f"//li[contains(@class, 'p-tab') and normalize-space(.)='{tab}']"))
            element.click()
            # The tabs sit below the run graph: scroll them up so their content is in view.
            driver.execute_script("arguments[0].scrollIntoView()", element)
    except TimeoutException:
        print(f"warning: {url} did not show {tab or expect!r} within 30 s; saved it as it was")
    time.sleep(2)
    driver.save_screenshot(str(path))
    print(path)


def main() -> None:
    port = os.environ.get("PREFECT_SERVER_API_PORT", "4200")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui", help=f"Prefect UI address (default http://127.0.0.1:{port})")
    parser.add_argument("--api", help="Prefect API (default <ui>/api when --ui is given, "
                                      "else PREFECT_API_URL)")
    parser.add_argument("--out", type=Path, default=Path("outputs/screenshots") / stamp)
    args = parser.parse_args()
    ui = (args.ui or f"http://127.0.0.1:{port}").rstrip("/")
    # An explicit --ui wins over PREFECT_API_URL: env.sh always sets that (port 4200 by default).
    api = args.api or (args.ui and f"{ui}/api") or os.environ.get("PREFECT_API_URL", f"{ui}/api")
    api = api.rstrip("/")

    for url in (f"{api}/health", f"{ui}/"):
        try:
            httpx.get(url, timeout=10).raise_for_status()
        except httpx.HTTPError as exc:
            fail(f"{url} is unreachable ({exc}); start the server with `make up` "
                 f"(or pass --ui / set PREFECT_API_URL to the running one)")
    # Never overwrite an earlier set of screenshots.
    if args.out.exists() and any(args.out.iterdir()):
        fail(f"{args.out} already holds files; pick another --out")
    driver = browser()  # before mkdir: a missing browser leaves no empty folder behind
    try:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        client = SyncPrefectClient(api)
        shoot(driver, f"{ui}/deployments", "nightly", out / "01-deployments.png")

        try:
            deployment = client.read_deployment_by_name("nightly/nightly")
        except ObjectNotFound:
            print("skip: no deployment nightly/nightly (run `prefect --no-prompt deploy --all`)")
        else:
            page = f"{ui}/deployments/deployment/{deployment.id}"
            shoot(driver, page, "nightly", out / "02-deployment-nightly.png")
            # The custom-run form lists every parameter; "folder" is the first one.
            shoot(driver, f"{page}/run", "folder", out / "03-deployment-nightly-run-form.png")

        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["nightly"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINISHED))),
            sort=FlowRunSort.END_TIME_DESC, limit=20)
        # A night that trained shows the whole chain (build, train and evaluate children); an
        # early stop has the build child only. Take the newest that trained, else the newest.
        def children(r) -> int:
            return len(client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[r.id]))))
        runs = sorted(runs, key=lambda r: children(r) < 2)  # stable: newest first within each group
        if not runs:
            print("skip: no finished run of the flow nightly yet")
        else:
            run = runs[0]
            page = f"{ui}/runs/flow-run/{run.id}"
            shoot(driver, page, run.name, out / "04-nightly-run.png")
            # The run page keeps its tab in the query string (?tab=<label>).
            shoot(driver, page, run.name, out / "05-nightly-run-subflows.png", tab="Subflow Runs")
            shoot(driver, page, run.name, out / "06-nightly-run-artifacts.png", tab="Artifacts")

        shoot(driver, f"{ui}/artifacts", "Artifacts", out / "07-artifacts.png")
        registry = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["model-registry"])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
        if not registry:
            print("skip: no artifact with key model-registry yet")
        else:
            # The artifact's own page renders its content (the key page lists only versions).
            shoot(driver, f"{ui}/artifacts/artifact/{registry[0].id}", "model-registry",
                  out / "08-artifact-model-registry.png")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
