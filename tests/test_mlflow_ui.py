"""The MLflow web UI, in a real (headless) Chromium: what a person sees of two pipeline runs.

MLflow 3.17's UI picks between its "GenAI" views (traces overview) and its "Model training" views (runs
table) from the browser alone: the URL's ``workflowType`` query parameter wins, else localStorage's
``mlflow.workflowType_v1`` (JSON ``"genai"`` or ``"machine_learning"``, written only when the user clicks
the sidebar's GenAI / Model training switch), else GenAI. The experiment tag ``mlflow.experimentKind`` does
not take part, and the server has no setting for it. So a link that opens the training runs for a new
browser carries ``?workflowType=machine_learning``.

Needs the ``playwright`` package and Debian's ``/usr/bin/chromium`` (no ``playwright install``); skipped
without them. Screenshots go to ``$AESR1_SCREENSHOTS`` (else the test's tmp folder).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402

from aesr1 import environment  # noqa: E402

EXPERIMENT = "aesr1"
ROLE_TAG = "aesr1.role"
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "workflowType=machine_learning"  # the URL parameter that picks the UI's model-training views
WORKFLOW_KEY = "mlflow.workflowType_v1"  # the UI's useLocalStorage key ("mlflow.workflowType", version 1)
SERVER_START_S = 120
NAVIGATION_MS = 60_000
WAIT_MS = 30_000
expect = sync_api.expect
expect.set_options(timeout=WAIT_MS)  # every expect() below waits at most this long


@pytest.fixture
def store_uri(tmp_path):
    """The same SQLite store the autouse ``_isolated_tracking`` fixture points MLFLOW_TRACKING_URI at."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def two_pipeline_runs(store_uri, tmp_path, monkeypatch):
    """Two pipeline executions through the project's own stage runner (``run_stage``), in ``store_uri``:
    their params files differ in the RL learning rate, and each ends with an evaluate stage that gives the
    pipeline run its ``rapo/plcc`` and ``sft/plcc``."""
    from aesr1.config import config
    from aesr1.stage import run_stage
    from aesr1.summary import model_metrics

    @config
    class Toy:
        rate: float = 0.5

    def evaluated(rapo_plcc):
        def stage(cfg, recorder):
            figures = {"sft": {"average": {"plcc": 0.30104, "srcc": 0.29}},
                       "rapo": {"average": {"plcc": rapo_plcc, "srcc": 0.35}}}
            recorder.pipeline_metrics(model_metrics(figures))
            return {"done": 1}
        return stage

    monkeypatch.chdir(tmp_path)
    identity = ["-c", "user.name=aesr1 tests", "-c", "user.email=tests@aesr1.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for number, (learning_rate, rapo_plcc) in enumerate(((5.0e-5, 0.37612), (1.0e-4, 0.41187))):
        monkeypatch.setenv(environment.PIPELINE_ID, f"pipeline-{number}")
        (tmp_path / "params.yaml").write_text(
            f"recipe: custom\nrl:\n  grpo: {{learning_rate: {learning_rate}}}\nevaluate: {{rate: 0.5}}\n")
        subprocess.run(["git", *identity, "commit", "-qm", f"lr {learning_rate}", "--", "params.yaml"]
                       if number else ["git", "add", "params.yaml"], cwd=tmp_path, check=True)
        if not number:  # each run from its own commit, so the runs' names (date, commit) differ as a user's do
            subprocess.run(["git", *identity, "commit", "-qm", "first"], cwd=tmp_path, check=True)
        run_stage("evaluate", "params.yaml", Toy, evaluated(rapo_plcc), metrics_dir=tmp_path / "metrics")


def pipeline_runs(store_uri):
    """The experiment and its two top-level pipeline runs, oldest first."""
    client = MlflowClient(tracking_uri=store_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} in {store_uri}"
    runs = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(runs) == 2, f"expected two top-level pipeline runs, found {len(runs)}"
    return experiment, runs


def format_metric(value: float) -> str:
    """What the UI prints for a metric: MLflow's ``Utils.formatMetric`` (3 decimals below 10)."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    text = repr(round(value, digits))
    return text[:-2] if text.endswith(".0") else text


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(two_pipeline_runs, store_uri, tmp_path):
    """``mlflow server`` on a free loopback port, serving ``store_uri``; yields its base URL."""
    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
           "--default-artifact-root", (tmp_path / "artifacts").as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: uvicorn's workers stop with it
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, f"mlflow server exited {server.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"mlflow server not up in {SERVER_START_S}s:\n" \
                                                f"{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=NAVIGATION_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("AESR1_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fresh_page(browser, base, height=900):
    """A page in a new browser context: an empty profile (no localStorage), as a new user's browser.

    Requests anywhere but the server are refused, so nothing leaves the loopback interface."""
    context = browser.new_context(viewport={"width": 1400, "height": height})
    server = urlsplit(base).netloc

    def loopback_only(route):
        if urlsplit(route.request.url).netloc == server:
            route.continue_()
        else:
            route.abort()

    context.route("**/*", loopback_only)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.set_default_navigation_timeout(NAVIGATION_MS)
    return page


def shot(page, folder: Path, name: str, full_page: bool = False) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


def stored_workflow(page):
    return page.evaluate(f"() => window.localStorage.getItem({WORKFLOW_KEY!r})")


def test_compare_view_shows_both_runs_metrics_and_the_param_that_differs(mlflow_ui, browser, store_uri, screenshots):
    experiment, runs = pipeline_runs(store_uri)
    differing = sorted(k for k in runs[0].data.params if runs[0].data.params[k] != runs[1].data.params.get(k))
    assert differing, "the two pipeline runs have the same params"
    run_ids = [r.info.run_id for r in runs]
    # the form MLflow's own links use (Routes.getCompareRunPageRoute: JSON.stringify of the id lists), plus the
    # model-training sidebar for a new browser
    url = (f"{mlflow_ui}/#/compare-runs?runs={json.dumps(run_ids, separators=(',', ':'))}"
           f"&experiments={json.dumps([experiment.experiment_id])}&{MODEL_TRAINING}")
    print(f"compare view: {url}")
    page = fresh_page(browser, mlflow_ui, height=1700)
    page.goto(url)
    expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()
    expect(page.get_by_role("link", name="Model registry")).to_be_visible()  # the model-training sidebar

    # the run details table has one column per run, in the URL's order
    run_id_row = page.locator("tr", has_text="Run ID:")
    expect(run_id_row).to_have_count(1)
    expect(run_id_row.locator("th, td")).to_have_text(["Run ID:", *run_ids])

    for name in differing:
        row = page.locator("tr").filter(has=page.get_by_text(name, exact=True))
        expect(row).to_have_count(1)
        expect(row.locator("th, td")).to_have_text([name, *(r.data.params[name] for r in runs)])

    # metrics are a virtualized grid: the names in one column, the values beside them, so match by screen row
    values = [format_metric(r.data.metrics["rapo/plcc"]) for r in runs]
    cells = [page.get_by_text(v, exact=True).first for v in values]
    for cell in cells:
        expect(cell).to_be_visible()
    boxes = [c.bounding_box() for c in cells]
    row_y = boxes[0]["y"] + boxes[0]["height"] / 2
    assert abs(boxes[1]["y"] + boxes[1]["height"] / 2 - row_y) < 4, "the two rapo/plcc values are not on one row"
    assert boxes[0]["x"] < boxes[1]["x"], "rapo/plcc values are not in the runs' column order"
    id_boxes = [run_id_row.locator("th, td").nth(i + 1).bounding_box() for i in range(2)]
    for box, id_box in zip(boxes, id_boxes):
        assert id_box["x"] <= box["x"] < id_box["x"] + id_box["width"], "a rapo/plcc value is under the wrong run"
    labels = page.get_by_text("rapo/plcc", exact=True)
    label_rows = [b["y"] + b["height"] / 2 for b in (labels.nth(i).bounding_box() for i in range(labels.count())) if b]
    assert any(abs(y - row_y) < 4 for y in label_rows), "no rapo/plcc label on the row of its values"
    expect(page.locator(".js-plotly-plot").first).to_be_visible()  # the parallel coordinates plot, for the picture
    page.get_by_role("switch").first.click()  # the Parameters table's "Show diff only", as a person compares
    expect(page.get_by_text("recipe", exact=True)).to_have_count(0)
    shot(page, screenshots, "01_compare_runs", full_page=True)
    page.context.close()


def test_experiment_link_opens_a_new_browser_on_the_training_runs(mlflow_ui, browser, store_uri, screenshots):
    experiment, runs = pipeline_runs(store_uri)
    assert experiment.tags.get(KIND_TAG) == "custom_model_development"
    eid = experiment.experiment_id

    # MLflow's default for a new browser: the GenAI overview, whatever the experiment's kind tag says
    page = fresh_page(browser, mlflow_ui)
    page.goto(f"{mlflow_ui}/#/experiments/{eid}")
    expect(page).to_have_url(re.compile(rf"#/experiments/{eid}/overview\b.*workflowType=genai"))
    expect(page.get_by_text("Latency", exact=True)).to_be_visible()  # the traces overview's charts
    assert stored_workflow(page) is None
    try:  # a first visit gets a modal "Detect Issues in Your Traces" tip; a person closes it first
        page.get_by_role("button", name="Got it", exact=True).click(timeout=10_000)
    except sync_api.TimeoutError:
        pass
    shot(page, screenshots, "02_experiment_new_browser_default_genai")

    # the one click otherwise: the sidebar switch "GenAI | Model training"; it is remembered in localStorage
    page.get_by_role("button", name="Model training", exact=True).click()
    expect(page).to_have_url(re.compile(rf"#/experiments/{eid}/runs\?workflowType=machine_learning\b"))
    assert json.loads(stored_workflow(page)) == "machine_learning"
    again = page.context.new_page()
    again.goto(f"{mlflow_ui}/#/experiments/{eid}")
    expect(again).to_have_url(re.compile(rf"#/experiments/{eid}/runs\b"))
    for run in runs:
        expect(again.get_by_role("link", name=run.data.tags[MLFLOW_RUN_NAME], exact=True)).to_be_visible()
    shot(again, screenshots, "03_experiment_after_model_training_click")
    page.context.close()

    # the supported link for a new browser: the workflowType query parameter
    url = f"{mlflow_ui}/#/experiments/{eid}?{MODEL_TRAINING}"
    print(f"experiment link: {url}")
    page = fresh_page(browser, mlflow_ui)
    page.goto(url)
    expect(page).to_have_url(re.compile(rf"#/experiments/{eid}/runs\?workflowType=machine_learning\b"))
    for run in runs:
        expect(page.get_by_role("link", name=run.data.tags[MLFLOW_RUN_NAME], exact=True)).to_be_visible()
    every_run = MlflowClient(tracking_uri=store_uri).search_runs([eid])  # the pipeline runs and their stages
    expect(page.get_by_text(f"{len(every_run)} matching runs")).to_be_visible()
    # model-training navigation (the GenAI sidebar has Traces/Sessions/Judges... and no "Model registry")
    expect(page.get_by_role("link", name="Model registry")).to_be_visible()
    expect(page.get_by_role("link", name="Judges")).to_have_count(0)
    assert stored_workflow(page) is None  # the parameter works without writing the browser's choice
    shot(page, screenshots, "04_experiment_link_workflowType_machine_learning")
    page.context.close()
