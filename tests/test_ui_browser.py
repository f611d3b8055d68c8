"""The MLflow UI in Debian's Chromium: a finished LR study's run list, its compare page and its range-test plot.

`lr-finder server` on sqlite holds one real `python -m mlproject compare` study (small settings). Screenshots go
to test-artifacts/ui-*.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, as_options, requires_fashion_mnist, running_server, small_job

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    requires_fashion_mnist,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium missing: apt-get install chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright missing: pip install -e '.[test]'")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS += ["--no-first-run"]
STUDY = as_options(small_job(train_subset=3000, epochs=2, lr_steps=30))
COLUMNS = [
    ("Parameters", "lr_source"),
    ("Parameters", "lr_used"),
    ("Parameters", "lr_suggested"),
    ("Metrics", "test_acc"),
]
SHOTS = REPO / "test-artifacts"
TIMEOUT_MS = 60_000  # the UI's first load on a busy 2-core machine


@dataclass(frozen=True)
class Study:
    url: str
    experiment_id: str
    parent_id: str
    children: list  # mlflow Run objects, one per LR
    finder_id: str


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """A running server holding one finished compare study: a parent run and four child runs."""
    folder = tmp_path_factory.mktemp("ui")
    with running_server(folder, f"sqlite:///{folder}/mlflow.db", "--workers", "2") as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_RUN_ID", None)
        args = [sys.executable, "-m", "mlproject", "compare", *STUDY, "--experiment-name", "study"]
        done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(server.url)
        experiment_id = client.get_experiment_by_name("study").experiment_id
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
        (finder,) = [r for r in children if r.data.params["lr_source"] == "finder"]
        parent_id = children[0].data.tags["mlflow.parentRunId"]
        yield Study(server.url, experiment_id, parent_id, children, finder.info.run_id)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1800, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def open_page(page, url: str, ready_text: str) -> None:
    page.goto(url, wait_until="load")
    page.get_by_text(ready_text, exact=True).first.wait_for()
    assistant = page.get_by_role("button", name="Close")  # the assistant panel takes a third of the screen
    if assistant.count() == 1 and assistant.is_visible():
        assistant.click()


def shot(page, name: str, clip: dict[str, float] | None = None) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"ui-{name}.png"
    page.screenshot(path=str(path), clip=clip, full_page=clip is not None)
    return path


def region(page, first: str, last: str, width: float) -> dict[str, float]:
    """The page area from one text's element to another's, in page coordinates, for a tight screenshot."""
    top, bottom = (page.get_by_text(t, exact=True).first.bounding_box() for t in (first, last))
    assert top is not None and bottom is not None
    scroll = page.evaluate("window.scrollY")
    return {
        "x": top["x"] - 12,
        "y": top["y"] + scroll - 8,
        "width": width,
        "height": bottom["y"] + bottom["height"] - top["y"] + 16,
    }


def show_column(page, group: str, name: str) -> None:
    """Tick a column in the run table's column selector (open), by group: a key can be a param and a metric."""
    page.get_by_placeholder("Search columns").fill(name)
    nodes = page.get_by_role("dialog").locator(".du-bois-light-tree-treenode:visible")
    nodes.filter(has_text=name).first.wait_for()
    texts = nodes.all_inner_texts()
    start = next(i for i, text in enumerate(texts) if text.startswith(group))
    node = next(i for i in range(start + 1, len(texts)) if texts[i] == name)
    nodes.nth(node).locator(".du-bois-light-tree-checkbox").click()


def row_text(page, run_id: str) -> str:
    """A run's row as shown: ag-grid splits a row into pinned and scrolling parts, all with the run id."""
    return " | ".join(page.locator(f'[role=row][row-id="{run_id}"]').all_inner_texts())


def row_showing(page, run_id: str, texts: list[str], timeout: float = 15) -> str:
    """The run's row once it shows all of `texts` (cells may render a frame after the row), or as it is then."""
    deadline = time.monotonic() + timeout
    while not all(text in (shown := row_text(page, run_id)) for text in texts) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    return shown


def test_run_list_shows_each_child_runs_lr_choice_and_test_accuracy(study, page):
    began = time.monotonic()
    open_page(page, f"{study.url}/#/experiments/{study.experiment_id}/runs", f"{1 + len(study.children)} matching runs")
    page.get_by_role("button", name="Columns").click()
    for group, name in COLUMNS:
        show_column(page, group, name)
    for attribute in ("Dataset", "Source", "Models"):  # room for the four
        show_column(page, "Attributes", attribute)
    page.keyboard.press("Escape")
    parent_row = page.locator(f'[role=row][row-id="{study.parent_id}"]')
    parent_row.locator("button[data-component-id*=runnamecellrenderer]").click()  # expand the study
    page.locator(f'[role=row][row-id="{study.finder_id}"]').first.wait_for()
    for _, name in COLUMNS:
        playwright_api.expect(page.get_by_role("columnheader", name=name).first).to_be_visible()
    for run in study.children:
        params = run.data.params
        expected = [run.info.run_name, params["lr_source"], params["lr_used"], repr(run.data.metrics["test_acc"])]
        if params["lr_source"] == "finder":
            expected.append(params["lr_suggested"])
        shown = row_showing(page, run.info.run_id, expected)
        assert all(text in shown for text in expected), (expected, shown)
    shot(page, "runs")
    print(f"\nrun list checked in {time.monotonic() - began:.1f} s")


def test_compare_page_lines_up_the_lr_params_of_the_four_runs(study, page):
    ids, experiments = (
        quote(json.dumps([r.info.run_id for r in study.children])),
        quote(json.dumps([study.experiment_id])),
    )
    url = f"{study.url}/#/compare-runs?runs={ids}&experiments={experiments}"
    open_page(page, url, "Comparing 4 Runs from 1 Experiment")
    page.get_by_text("lr_used", exact=True).first.wait_for()
    shown = page.inner_text("body").splitlines()
    for key in ("lr_source", "lr_used", "lr_suggested"):
        expected = "\t".join([key, *(r.data.params.get(key, "") for r in study.children)])
        assert expected.rstrip("\t") in (line.rstrip("\t") for line in shown), key
    page.get_by_text("Show diff only").first.click()  # only the params that differ: the study in one table
    page.get_by_text("lr_suggested", exact=True).first.scroll_into_view_if_needed()
    shot(page, "compare", region(page, "Run details", "test_loss", 1130))  # run names, then the differing params


def test_range_test_plot_renders_in_the_finder_runs_artifacts(study, page):
    url = f"{study.url}/#/experiments/{study.experiment_id}/runs/{study.finder_id}/artifacts"
    open_page(page, url, "lr_find")
    plot = page.get_by_text("loss_vs_lr.png", exact=True).first
    if not plot.is_visible():
        page.get_by_text("lr_find", exact=True).first.click()  # open the folder
    plot.click()
    page.get_by_text("lr_find/loss_vs_lr.png", exact=True).first.wait_for()
    page.wait_for_function(
        "() => [...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"
    )
    widths = page.locator("img").evaluate_all(
        "els => els.filter(i => i.src.startsWith('blob:')).map(i => i.naturalWidth)"
    )
    assert max(widths) >= 400  # the figure itself, not an icon
    shot(page, "lr-find-plot")
