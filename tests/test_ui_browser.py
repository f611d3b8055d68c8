"""The MLflow UI in Debian's Chromium: a finished LR study's run list, its compare page, its range-test plot, and
the chart view overlaying two runs' range tests.

`lr-finder server` on sqlite holds one real `python -m mlproject compare` study and one SGD `train` run beside it
(small settings). Screenshots go to test-artifacts/ui-*.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import (
    REPO,
    as_options,
    finish,
    job_env,
    requires_fashion_mnist,
    running_server,
    small_job,
    start_job,
)

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
# A second range test that differs from the study's (SGD's curve turns at a larger LR), at the cost of one epoch.
SGD = as_options(small_job(train_subset=3000, epochs=1, lr_steps=30, optimizer="sgd"))
# What the job names its runs: the study after its model and optimizer, its members after their LR.
STUDY_NAME, SGD_NAME = "lenet-adam-study", "lenet-sgd-finder"
MEMBER_NAMES = {"lr=1e-05", "lr=0.0001", "lr=0.1", "lr=finder"}
COLUMNS = [
    ("Parameters", "lr_source"),
    ("Parameters", "lr_used"),
    ("Parameters", "lr_suggested"),
    ("Metrics", "test_acc"),
]
SHOTS = REPO / "test-artifacts"
# The range-test chart: the smoothed loss (what the suggestion reads) against the LR. MLflow draws a metric x axis
# on a linear scale only: its log switch is offered, and applied, for the step axis alone.
CURVE_METRIC, LR_METRIC = "lr_find_smoothed_loss", "lr_find_log10_lr"
RUN_COLORS = ("#2272b4", "#de7921")  # MLflow colours a run by a hash of its id, and two runs can share one
TIMEOUT_MS = 60_000  # the UI's first load on a busy 2-core machine


@dataclass(frozen=True)
class Study:
    url: str
    experiment_id: str
    parent_id: str  # the study's own run: the range test's curve, plot and suggestion
    children: list  # mlflow Run objects, one per LR
    finder_id: str
    sgd_id: str  # a train run beside the study, whose range test is SGD's
    run_count: int


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """A running server holding one finished compare study (a parent run and four child runs) and an SGD run."""
    folder = tmp_path_factory.mktemp("ui")
    with running_server(folder, f"sqlite:///{folder}/mlflow.db", "--workers", "2") as server:
        client = MlflowClient(server.url)
        experiment_id = client.create_experiment("study")  # before both jobs, which would race to create it
        env = job_env(server.url, OMP_NUM_THREADS="1")  # two jobs share two cores
        jobs = [start_job(folder, "compare", *STUDY, env=env, experiment="study")]
        jobs.append(start_job(folder, "train", *SGD, env=env, experiment="study"))
        for code, _, err in [finish(job, timeout=600) for job in jobs]:  # both ended before either fails the test
            assert code == 0, err[-3000:]
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
        assert all(r.info.status == "FINISHED" for r in runs)
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 4
        (finder,) = [r for r in children if r.data.params["lr_source"] == "finder"]
        parent_id = children[0].data.tags["mlflow.parentRunId"]
        (sgd,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_id != parent_id]
        yield Study(server.url, experiment_id, parent_id, children, finder.info.run_id, sgd.info.run_id, len(runs))


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
    assert {r.info.run_name for r in study.children} == MEMBER_NAMES
    open_page(page, f"{study.url}/#/experiments/{study.experiment_id}/runs", f"{study.run_count} matching runs")
    page.get_by_role("button", name="Columns").click()
    for group, name in COLUMNS:
        show_column(page, group, name)
    for attribute in ("Dataset", "Source", "Models"):  # room for the four
        show_column(page, "Attributes", attribute)
    page.keyboard.press("Escape")
    for run_id, name in ((study.parent_id, STUDY_NAME), (study.sgd_id, SGD_NAME)):
        shown = row_showing(page, run_id, [name])
        assert name in shown, (name, shown)
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


def test_range_test_plot_renders_in_the_study_runs_artifacts(study, page):
    url = f"{study.url}/#/experiments/{study.experiment_id}/runs/{study.parent_id}/artifacts"  # the study ran it once
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


def test_chart_view_overlays_the_range_tests_of_two_runs_against_the_lr(study, page):
    began = time.monotonic()
    client = MlflowClient(study.url)
    runs = {STUDY_NAME: study.parent_id, SGD_NAME: study.sgd_id}
    for run_id, color in zip(runs.values(), RUN_COLORS, strict=True):
        client.set_tag(run_id, "mlflow.runColor", color)
    page.set_viewport_size({"width": 1280, "height": 720})  # the full-screen chart at a size a README shows
    url = f"{study.url}/#/experiments/{study.experiment_id}/runs?compareRunsMode=CHART"
    open_page(page, url, "Model metrics")  # the section of the charts made one per metric
    card = put_metric_on_x_axis(page, CURVE_METRIC, LR_METRIC)
    lines = plotted_lines(card, LR_METRIC, set(runs))
    for name, run_id in runs.items():
        expected = metric_pairs(client, run_id, LR_METRIC, CURVE_METRIC)
        assert len(expected[0]) >= 20, (name, expected)  # the sweep's steps, not a last value
        for drawn, logged in zip(lines[name], expected, strict=True):  # x, then y
            assert drawn == pytest.approx(logged, rel=1e-6), name
    card.locator("button[data-component-id=fullscreen_button_chartcard]").click()
    chart = page.get_by_role("dialog")
    plotted_lines(chart, LR_METRIC, set(runs))  # drawn again at full size
    legend = chart.inner_text()
    assert all(f"{name} ({CURVE_METRIC})" in legend for name in runs), legend
    page.mouse.move(0, 0)  # no plotly toolbar in the picture
    shot(page, "range-tests", modal_region(chart, f"{STUDY_NAME} ({CURVE_METRIC})"))
    print(f"\nrange tests charted in {time.monotonic() - began:.1f} s")


def put_metric_on_x_axis(page, title: str, x_metric: str) -> playwright_api.Locator:
    """The chart card `title` (as the chart view makes one per metric) with the metric `x_metric` on its x axis,
    through the card's Configure dialog; returns the card."""
    page.get_by_placeholder("Search metric charts").fill(title)  # this card alone on the screen
    heading = page.get_by_role("heading", name=title, exact=True)
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=heading)
    card.locator("button:not([data-component-id=fullscreen_button_chartcard])").last.click()  # the card's menu
    page.get_by_role("menuitem", name="Configure").click()
    dialog = page.get_by_role("dialog")
    dialog.locator("input[name=runs-charts-field-group-x-axis][value=metric]").check()
    choose = dialog.locator(".du-bois-light-select").filter(has_text="Select metric").locator("input[role=combobox]")
    choose.click()
    choose.fill(x_metric)
    page.locator(".du-bois-light-select-item-option").filter(has_text=x_metric).first.click()
    dialog.get_by_role("button", name="Save changes").click()
    dialog.wait_for(state="hidden")
    return card


def plotted_lines(
    chart: playwright_api.Locator, x_title: str, names: set[str], timeout: float = 30
) -> dict[str, tuple[list, list]]:
    """Run name -> its line's x and y values as plotly holds them, once the chart's x axis is `x_title` and every
    one of `names` has a line (plotly draws a frame or more after the config changes)."""
    script = """g => g._fullLayout && g._fullLayout.xaxis.title.text === X && g.data.map(t => [t.name, t.x, t.y])"""
    deadline = time.monotonic() + timeout
    while True:
        drawn = chart.locator(".js-plotly-plot").first.evaluate(script.replace("X", json.dumps(x_title))) or []
        lines: dict[str, tuple[list, list]] = {}
        for name, xs, ys in drawn:  # a run's first trace is its line; a faint copy (the unsmoothed line) follows
            lines.setdefault(name, (xs, ys))
        if names <= set(lines) or time.monotonic() > deadline:
            assert names <= set(lines), (x_title, names, sorted(lines))
            return lines
        chart.page.wait_for_timeout(200)


def metric_pairs(client: MlflowClient, run_id: str, x_key: str, y_key: str) -> tuple[list, list]:
    """Two metrics' values at the steps both were logged, in step order: what a chart of y against x must draw."""
    xs, ys = ({m.step: m.value for m in client.get_metric_history(run_id, key)} for key in (x_key, y_key))
    steps = sorted(xs.keys() & ys.keys())
    return [xs[step] for step in steps], [ys[step] for step in steps]


def modal_region(dialog: playwright_api.Locator, last: str) -> dict[str, float]:
    """A modal's box from its top down to the text `last`, for a tight screenshot (the modal's lower part is empty)."""
    box, end = dialog.locator(".du-bois-light-modal-content").bounding_box(), dialog.get_by_text(last).bounding_box()
    assert box is not None and end is not None
    return {"x": box["x"], "y": box["y"], "width": box["width"], "height": end["y"] + end["height"] + 16 - box["y"]}
