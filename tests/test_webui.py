"""The Dagster web UI on the project's definitions, driven like a user would: a real dagster-webserver,
headless Chromium, a materialisation of one demo partition through the UI's GraphQL API, then the whole
demo chain (what ``make demo`` runs) and what the UI shows of it: no asset misses a partition, and every
run is named after the asset it ran.

Leaves test-artifacts/webui_asset_graph.png and webui_contact_sheet.png (gitignored) for a human to look at.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helpers_servers import dagster_webserver, graphql, headless_chromium, private_demo_config

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
SOURCE = "demo_plant_line1"
RUN_TIMEOUT_S = 300

WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename
      ... on RepositoryLocation { name repositories { name } }
      ... on PythonError { message stack } } } } } }
"""
ASSETS_QUERY = "{ assetNodes { assetKey { path } isExecutable jobNames partitionDefinition { name } } }"
ADD_PARTITION = """
mutation($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename ... on AddDynamicPartitionSuccess { partitionKey } ... on Error { message } } }
"""
LAUNCH_RUN = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on Error { message } } }
"""
RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
RUN_FAILURES = """
query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { __typename
  ... on ExecutionStepFailureEvent { stepKey error { message } }
  ... on EngineEvent { message error { message } } } } } }
"""
PARTITION_STATS = """
{ assetNodes { assetKey { path } isMaterializable partitionDefinition { name }
  partitionStats { numMaterialized numPartitions numFailed numMaterializing } } }
"""
RUNS = "{ runsOrError(limit: 1000) { ... on Runs { results { runId jobName status } } } }"
MATERIALIZATIONS = """
query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
  assetMaterializations(limit: 5) { partition runId } } } }
"""


def _wait_for_location(url: str, timeout_s: float = 120) -> tuple[str, str]:
    """(location name, repository name) once the code location is loaded; its load error otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = graphql(url, WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
        if entries and entries[0]["loadStatus"] == "LOADED":
            location = entries[0]["locationOrLoadError"]
            assert location["__typename"] == "RepositoryLocation", f"definitions failed to load: {location}"
            return location["name"], location["repositories"][0]["name"]
        time.sleep(1)
    raise TimeoutError("code location did not load")


def _wait_for_run(url: str, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        status = graphql(url, RUN_STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise TimeoutError(f"run {run_id} did not finish in {RUN_TIMEOUT_S} s")


def _wait_for_text(driver, texts: list[str], timeout_s: float = 60) -> str:
    """Wait until the rendered page text holds every one of ``texts`` (the UI renders asynchronously)."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(text in body for text in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"page {driver.current_url} never showed {missing}; it shows:\n{body[:2000]}")


FIND_PREVIEW = """
const img = [...document.querySelectorAll('img')].find(i => i.src.startsWith('data:image/jpeg'));
if (!img || !img.complete) return null;
const box = img.closest('[role=dialog]') || img.closest('.bp5-dialog') || document.body;
return [img.naturalWidth, img.naturalHeight, img.alt, box.innerText];
"""


def _assert_labelled_preview_renders(driver, url: str) -> None:
    """The image_index page shows the ingestion contact sheet: a decoded JPEG grid (256 px tiles with their
    captions) behind the contact_sheet entry, with its colour legend; saved as webui_contact_sheet.png."""
    driver.get(f"{url}/assets/image_index?view=events&partition={SOURCE}")
    _wait_for_text(driver, ["contact_sheet", "[Show Markdown]"])
    links = driver.find_elements(
        "xpath", "//*[text()='contact_sheet']/ancestor::tr[1]//*[text()='[Show Markdown]']"
    ) or driver.find_elements("xpath", "//*[text()='[Show Markdown]']")
    found = None
    for link in links:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", link)
        link.click()
        deadline = time.monotonic() + 10
        while found is None and time.monotonic() < deadline:
            found = driver.execute_script(FIND_PREVIEW)
            time.sleep(0.3)
        if found is not None:
            break
        driver.find_element("tag name", "body").send_keys("\ue00c")  # Escape: not this entry's dialog
    assert found is not None, "no inline JPEG preview rendered on the image_index page"
    width, height, alt, text = found
    assert width >= 256 and height >= 256 + 3 * 15, (width, height)  # a tile and its caption band at least
    assert alt == SOURCE and "green: ground-truth boxes and mask outlines" in text, (alt, text[:500])
    assert driver.save_screenshot(str(ARTIFACTS / "webui_contact_sheet.png"))


def _assert_demo_chain_complete_in_the_ui(url: str, config_path: Path, ui_run_id: str) -> None:
    """Run the demo chain headless on the webserver's instance; the UI then shows every partition of every
    asset materialised (pretraining assets hold no downstream key) and runs named after their asset."""
    from agssp_pipeline.config import load_config
    from agssp_pipeline.definitions import build_definitions
    from agssp_pipeline.orchestration import materialize_selection, prepare_instance

    config = load_config(config_path)
    instance = prepare_instance(config, str(config_path))
    report = materialize_selection(build_definitions(str(config_path)), config, instance, log_level="WARNING")
    assert not report.failed, "\n".join(report.summary_lines())
    nodes = [n for n in graphql(url, PARTITION_STATS)["assetNodes"] if n["isMaterializable"]]
    partitioned = {"/".join(n["assetKey"]["path"]): n for n in nodes if n["partitionDefinition"]}
    assert {"image_index", "anomaly_maps", "pseudo_boxes", "backbone_checkpoint"} <= set(partitioned)
    for name, node in partitioned.items():
        stats = node["partitionStats"]
        assert stats["numPartitions"] > 0 and stats["numMaterialized"] == stats["numPartitions"], (name, stats)
        assert stats["numFailed"] == 0, (name, stats)
    pretrain = {s.name for s in config.pretrain_sources()}
    assert partitioned["anomaly_maps"]["partitionStats"]["numPartitions"] == len(pretrain) < len(config.sources)
    runs = graphql(url, RUNS)["runsOrError"]["results"]
    assert runs and all(r["status"] == "SUCCESS" for r in runs)
    headless = [r for r in runs if r["runId"] != ui_run_id]
    assert {r["jobName"] for r in headless} == {f"materialize__{step.asset}" for step in report.steps}
    assert not [r for r in runs if r["jobName"].startswith("__ephemeral")]


@pytest.mark.slow
def test_asset_graph_renders_and_a_partition_materialises_from_the_ui(demo_corpus, tmp_path, monkeypatch):
    config_path = private_demo_config(demo_corpus, tmp_path / "demo_config")
    home = tmp_path / "dagster_home"
    home.mkdir()
    # runs launch at once (no daemon in this test); no first-visit newsletter dialog over the graph
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }))
    ARTIFACTS.mkdir(exist_ok=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the headless chain below writes to the UI's instance
    monkeypatch.setenv("AGSSP_CONFIG", str(config_path))
    with dagster_webserver(home, config_path, tmp_path / "logs") as url, \
            headless_chromium(tmp_path / "chromium-profile") as browser:
        location, repository = _wait_for_location(url)
        nodes = graphql(url, ASSETS_QUERY)["assetNodes"]
        # executable assets are the pipeline's own; a key only named as a dependency is a stub the UI hides
        asset_names = {"/".join(node["assetKey"]["path"]) for node in nodes if node["isExecutable"]}
        assert {"image_index", "plant_images"} <= asset_names

        # the catalog lists every asset of the definitions (a tall window: the list is virtualised)
        browser.set_window_size(1600, 4000)
        browser.get(f"{url}/assets")
        _wait_for_text(browser, sorted(asset_names))
        browser.set_window_size(1600, 1000)

        # register the demo source as a partition and materialise its index, as the UI's buttons do
        selector = {"repositoryLocationName": location, "repositoryName": repository}
        added = graphql(url, ADD_PARTITION, {"selector": selector, "name": "image_source", "key": SOURCE})
        assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", added
        (index_node,) = [n for n in nodes if n["assetKey"]["path"] == ["image_index"]]
        job_name = next(name for name in index_node["jobNames"] if name.startswith("__ASSET_JOB"))
        launched = graphql(url, LAUNCH_RUN, {"params": {
            "selector": {**selector, "jobName": job_name, "assetSelection": [{"path": ["image_index"]}]},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": SOURCE}]},
            # one process: the multiprocess executor would re-import torch once per step
            "runConfigData": {"execution": {"config": {"in_process": {}}}},
        }})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status = _wait_for_run(url, run_id)
        if status != "SUCCESS":
            events = graphql(url, RUN_FAILURES, {"id": run_id})["logsForRun"]["events"]
            errors = [e for e in events if e.get("error")]
            pytest.fail(f"run {run_id} ended {status}: {errors}")
        materializations = graphql(url, MATERIALIZATIONS, {"key": {"path": ["image_index"]}})
        records = materializations["assetOrError"]["assetMaterializations"]
        assert [(r["partition"], r["runId"]) for r in records] == [(SOURCE, run_id)]

        # the run page shows the success, the asset graph the materialised partition
        browser.get(f"{url}/runs/{run_id}")
        _wait_for_text(browser, ["Success", "image_index"])
        _assert_labelled_preview_renders(browser, url)
        browser.get(f"{url}/assets/image_index?view=partitions")
        _wait_for_text(browser, ["Materialized (1)", "Missing (0)", SOURCE])
        # a wide window: at small zoom the graph draws names only, without the partition status rows
        browser.set_window_size(2400, 1500)
        browser.get(f"{url}/assets/image_index?view=lineage")
        _wait_for_text(browser, ["image_index", "plant_images", "Partitions"])
        deadline = time.monotonic() + 30  # let the node status rows finish loading before the picture
        while "Loading" in browser.find_element("tag name", "body").text and time.monotonic() < deadline:
            time.sleep(0.5)
        screenshot = ARTIFACTS / "webui_asset_graph.png"
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 20_000, "screenshot suspiciously small: did the page render?"

        _assert_demo_chain_complete_in_the_ui(url, config_path, run_id)
