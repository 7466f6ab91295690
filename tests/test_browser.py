"""The live page (parallel_nn/web/page/) in a real browser: headless Chromium driven by Selenium, against
the real server (serve.make_server, in this process, on 127.0.0.1) over real runs.

Skipped unless Selenium (the dev extra), Chromium and its driver are installed (Debian:
`apt-get install chromium chromium-driver`, whose versions match); Selenium downloads nothing, as
the system's driver and browser are passed to it.

Also a script, for the picture in docs/live.md:

    .venv/bin/python -m tests.test_browser --screenshot docs/live.png RUNS_DIR [--run NAME]

serves RUNS_DIR, draws a 7 on the pad and saves the whole page as a PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="Selenium is not installed (pip install -e '.[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from parallel_nn.web.serve import make_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _first_existing(*candidates):
    return next((c for c in candidates if c and os.path.exists(c)), None)


CHROMIUM = _first_existing(shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
CHROMEDRIVER = _first_existing(shutil.which("chromedriver"), "/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")

WIDTH, HEIGHT = 1280, 2200
# The tests' network traffic stays on 127.0.0.1: no name resolves but the loopback address, and
# Chromium's own background services (updates, sync, safe browsing, metrics) are off.
LOOPBACK_ONLY = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                 "--no-first-run", "--no-pings", "--metrics-recording-only",
                 "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication")


def start_browser(width: int = WIDTH, height: int = HEIGHT):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     "--force-device-scale-factor=1", *LOOPBACK_ONLY):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def serving(root: Path, data_dir: Path):
    """The real server over `root`, in a thread; yields its URL."""
    server = make_server(root, port=0, data_dir=str(data_dir))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.stop()
        thread.join(10)


def severe(driver, allow_network: bool = False) -> list[dict]:
    """The browser console's SEVERE entries since the last call (reading the log empties it);
    allow_network leaves out failed requests (what a server error looks like), not JS errors."""
    entries = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return [e for e in entries if not (allow_network and e.get("source") == "network")]


def leave(driver) -> None:
    """Close the page (and its event stream) before the server stops."""
    driver.get("about:blank")


def wait_for(driver, condition, timeout: float = 15, message: str = ""):
    """Until condition(driver) is true; an element the page replaced meanwhile (the runs table is
    rebuilt when a run changes) is looked up again at the next try."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: condition(d), message)


def selected_row(driver) -> str:
    """The text of the chosen run's row in the runs table, read in one go."""
    return driver.execute_script("const row = document.querySelector('#runs tbody tr.selected');"
                                 "return row ? row.innerText : '';")


def data_points(driver, element_id: str) -> int:
    value = driver.find_element(By.ID, element_id).get_attribute("data-points")
    return int(value) if value and value.isdigit() else 0


def draw_seven(driver) -> None:
    """A 7 on #pad: a bar along the top, then down and to the left (offsets from the pad's centre)."""
    pad = driver.find_element(By.ID, "pad")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
    chain = ActionChains(driver, duration=15)
    chain.move_to_element_with_offset(pad, -70, -85).click_and_hold()
    for dx, dy in [(20, 0)] * 7 + [(-6, 17)] * 10:
        chain.move_by_offset(dx, dy)
    chain.release().perform()


def prediction(driver):
    """(the digit in #prediction, the ten probabilities' data-p), read in one go; None while the
    page shows no prediction (each answer replaces the bars)."""
    digit, probabilities = driver.execute_script(
        "return [document.getElementById('prediction').textContent.trim(),"
        " Array.from(document.querySelectorAll('#probabilities > *')).map((b) => b.dataset.p)];")
    if not digit.isdigit() or len(probabilities) != 10:
        return None
    return int(digit), [float(p) for p in probabilities]


def wait_for_prediction(driver) -> tuple[int, list[float]]:
    time.sleep(0.3)  # the last answer to the drawing in flight
    return wait_for(driver, prediction, 15, "no digit in #prediction, or not ten probabilities")


def seen_image(driver) -> list[list[int]]:
    """The 28x28 grey image shown beside the pad (what was sent to the network)."""
    data = driver.execute_script(
        "const d = document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, 28).data;"
        "return Array.from(d).filter((v, i) => i % 4 === 0);")
    return [data[28 * y:28 * y + 28] for y in range(28)]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny real run with a trace: 2 epochs of 12 steps on the synthetic digits."""
    from parallel_nn.run.train import Config, train

    root = tmp_path_factory.mktemp("runs")
    train(Config(workers=2, epochs=2, batch_size=100, data_dir=str(tiny_data), run_dir=str(root / "tiny"),
                 trace=str(root / "tiny.trace.json"), quiet=True))
    return root


def test_the_page_with_no_runs_says_so_without_errors(browser, tiny_data, tmp_path):
    with serving(tmp_path, tiny_data) as url:
        severe(browser)
        browser.get(url)
        wait_for(browser, lambda d: "0 runs" in d.find_element(By.ID, "status").text, 10, "no status line")
        assert browser.find_element(By.ID, "no-runs").is_displayed()
        draw_seven(browser)  # nothing to ask: the page says so
        wait_for(browser, lambda d: "no run" in d.find_element(By.ID, "predict-note").text, 5)
        assert browser.find_element(By.ID, "prediction").text == "–"
        assert severe(browser) == []
        leave(browser)


def test_the_digits_it_gets_wrong_come_from_where_the_run_trained_and_a_missing_test_set_is_no_error(
        browser, finished_run, tmp_path):
    """serve started where no dataset is (its default --data-dir, from another folder): the run's
    config names where it trained, and the page reads the test set there. A run whose data is gone
    shows why in the panel, with nothing in the console."""
    shutil.copytree(finished_run / "tiny", tmp_path / "runs" / "tiny")
    with serving(tmp_path / "runs", tmp_path / "datasets" / "mnist") as url:
        severe(browser)
        browser.get(url + "#run=tiny")
        wait_for(browser, lambda d: "of 300 test digits wrong" in d.find_element(By.ID, "misclassified-summary").text, 15)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#misclassified canvas")) > 0
        assert severe(browser) == []
        leave(browser)
    config = json.loads((tmp_path / "runs" / "tiny" / "config.json").read_text())
    (tmp_path / "runs" / "tiny" / "config.json").write_text(json.dumps({**config, "data_dir": str(tmp_path / "gone")}))
    with serving(tmp_path / "runs", tmp_path / "datasets" / "mnist") as url:
        browser.get(url + "#run=tiny")
        wait_for(browser, lambda d: "make datasets" in d.find_element(By.ID, "misclassified-summary").text, 15)
        assert browser.find_elements(By.CSS_SELECTOR, "#misclassified canvas") == []
        assert severe(browser) == []  # no failed request logged
        leave(browser)


def test_a_finished_run_shows_its_curves_filters_timeline_and_reads_a_drawing(browser, finished_run, tiny_data):
    with serving(finished_run, tiny_data) as url:
        severe(browser)
        browser.get(url + "#run=tiny")
        # 2 epochs of 1,200 examples in batches of 100: 24 steps, 2 epochs.
        wait_for(browser, lambda d: data_points(d, "step-loss") == 24, 15, "the step curve did not load")
        wait_for(browser, lambda d: data_points(d, "epoch-accuracy") == 2, 5)
        assert data_points(browser, "throughput") == 24
        row = selected_row(browser)
        assert "tiny" in row and "finished" in row and "2 / 2" in row
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 32, 10, "no filters")
        wait_for(browser, lambda d: "of 300 test digits wrong" in d.find_element(By.ID, "misclassified-summary").text, 10)
        wait_for(browser, lambda d: int(d.find_element(By.ID, "timeline").get_attribute("data-spans") or 0) > 0, 10,
                 "no timeline")
        legend = browser.find_element(By.ID, "timeline-legend").text
        assert "forward" in legend and "backward" in legend

        draw_seven(browser)
        digit, probabilities = wait_for_prediction(browser)
        assert 0 <= digit <= 9 and len(probabilities) == 10
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-3) and max(probabilities) == probabilities[digit]

        # What the network was shown is MNIST-like: the ink's box has its longer side 20 pixels
        # (its faintest edge may round to 0) and its centre of mass is at the centre of the 28x28.
        image = seen_image(browser)
        ink = [(x, y, v) for y, row in enumerate(image) for x, v in enumerate(row) if v > 0]
        xs, ys = [x for x, _, _ in ink], [y for _, y, _ in ink]
        assert 18 <= max(max(xs) - min(xs) + 1, max(ys) - min(ys) + 1) <= 20
        mass = sum(v for _, _, v in ink)
        cx, cy = (sum((x + 0.5) * v for x, _, v in ink) / mass, sum((y + 0.5) * v for _, y, v in ink) / mass)
        assert abs(cx - 14) <= 0.75 and abs(cy - 14) <= 0.75
        assert max(v for _, _, v in ink) >= 200  # the stroke's middle is full ink

        browser.find_element(By.ID, "clear").click()
        assert browser.find_element(By.ID, "prediction").text == "–"
        assert severe(browser) == []
        # everything the page loaded or asked for came from the server on 127.0.0.1: nothing from elsewhere
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(name.startswith(url) for name in loaded), loaded
        assert url.startswith("http://127.0.0.1:")
        leave(browser)


def test_a_training_run_updates_its_curves_without_a_reload(browser, tiny_data, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    # Many short steps (60 an epoch), more than the test waits for; it is stopped once seen.
    trainer = subprocess.Popen(
        [sys.executable, "-m", "parallel_nn", "--workers", "1", "--epochs", "200", "--batch-size", "20",
         "--data-dir", str(tiny_data), "--run-dir", str(runs / "live"), "--quiet"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (runs / "live" / "progress.jsonl").exists():
            assert trainer.poll() is None, trainer.stderr.read().decode()
            assert time.monotonic() < deadline, "the trainer wrote no step in 60 s"
            time.sleep(0.1)
        with serving(runs, tiny_data) as url:
            severe(browser)
            browser.get(url + "#run=live")
            browser.execute_script("window.notReloaded = true")
            wait_for(browser, lambda d: data_points(d, "step-loss") > 0, 15, "no step plotted")
            first = data_points(browser, "step-loss")
            wait_for(browser, lambda d: data_points(d, "step-loss") > first + 5, 15, "the step curve did not grow")
            assert browser.execute_script("return window.notReloaded === true")  # the same page, not a reload
            row = selected_row(browser)
            assert "live" in row and "running" in row
            # Its first epoch ends while the page watches: the epoch curve and the filters follow.
            wait_for(browser, lambda d: data_points(d, "epoch-loss") >= 1, 60, "no epoch plotted")
            wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 32, 15, "no filters")
            assert browser.execute_script("return window.notReloaded === true")
            assert trainer.poll() is None  # it was live all along
            trainer.send_signal(signal.SIGINT)  # stops after the step in flight, with a checkpoint
            trainer.wait(60)
            wait_for(browser, lambda d: "stopped" in selected_row(d),
                     15, "the page did not see the run stop")
            assert severe(browser) == []
            leave(browser)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        trainer.stderr.close()


def test_server_errors_are_shown_not_thrown(browser, finished_run, tiny_data):
    with serving(finished_run, tiny_data) as url:
        severe(browser)
        browser.get(url + "#run=tiny")
        wait_for(browser, lambda d: data_points(d, "step-loss") == 24, 15)
        weights = finished_run / "tiny" / "weights.json"
        saved = weights.read_bytes()
        checkpoint = finished_run / "tiny" / "checkpoint.json"
        saved_checkpoint = checkpoint.read_bytes()
        try:
            weights.unlink()
            checkpoint.unlink()
            draw_seven(browser)  # the server answers 404: no weights
            wait_for(browser, lambda d: "cannot read it" in d.find_element(By.ID, "predict-note").text, 10)
            assert browser.find_element(By.ID, "prediction").text == "–"
        finally:
            weights.write_bytes(saved)
            checkpoint.write_bytes(saved_checkpoint)
    # The server is gone: the page says so and keeps trying.
    wait_for(browser, lambda d: "cannot list the runs" in d.find_element(By.ID, "status").text, 10)
    assert severe(browser, allow_network=True) == []  # failed requests, but no JavaScript error
    leave(browser)


def write_run(run: Path, steps: int, t0: float = 1000.0) -> None:
    """A run directory as a trainer leaves it before its first epoch ends: config, steps, no metrics."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"epochs": 5}))
    lines = "".join(json.dumps({"i": i, "epoch": i // 100 + 1, "step": i % 100 + 1, "steps": 100, "loss": 2.0 - i / 1e4,
                                "accuracy": 0.5, "examples_per_second": 100.0, "time": t0 + i}) + "\n" for i in range(steps))
    (run / "new.tmp").write_text(lines)
    os.replace(run / "new.tmp", run / "progress.jsonl")  # a new file, as --overwrite makes


def test_a_malformed_or_hand_edited_hash(browser, tiny_data, tmp_path):
    write_run(tmp_path / "one", 3)
    write_run(tmp_path / "two", 6000)  # more steps than one answer of /steps holds: the page asks for the rest
    with serving(tmp_path, tiny_data) as url:
        severe(browser)
        browser.get(url + "#run=%")
        wait_for(browser, lambda d: "2 runs" in d.find_element(By.ID, "status").text, 10, "no runs listed")
        wait_for(browser, lambda d: selected_row(d) != "", 10, "no run chosen")
        browser.execute_script("location.hash = '#run=two'")
        wait_for(browser, lambda d: "two" in selected_row(d), 10, "the hash did not choose the run")
        wait_for(browser, lambda d: data_points(d, "step-loss") == 6000, 15, "not every step was loaded")
        browser.execute_script("location.hash = '#run=%E0%A4%A'")
        browser.execute_script("location.hash = '#run=one'")
        wait_for(browser, lambda d: "one" in selected_row(d), 10)
        wait_for(browser, lambda d: data_points(d, "step-loss") == 3, 10)
        assert severe(browser) == []
        leave(browser)


def test_a_reused_run_directory_starts_the_page_over_and_a_deleted_one_is_gone(browser, tiny_data, tmp_path):
    from parallel_nn.run.rundir import RunLock

    run = tmp_path / "r"
    write_run(run, 30)
    with serving(tmp_path, tiny_data) as url:
        severe(browser)
        browser.get(url + "#run=r")
        wait_for(browser, lambda d: data_points(d, "step-loss") == 30, 15)
        assert "stopped" in selected_row(browser)
        with RunLock(run):  # a trainer in it again (--overwrite), with fewer steps so far
            write_run(run, 5, t0=5000)
            wait_for(browser, lambda d: "running" in selected_row(d), 15, "the page did not see it run")
            wait_for(browser, lambda d: data_points(d, "step-loss") == 5, 15, "the old run's steps stayed")
            write_run(run, 3, t0=9000)  # and again, while the page follows its stream
            wait_for(browser, lambda d: data_points(d, "step-loss") == 3, 15, "no reset from the stream")
            shutil.rmtree(run)
            wait_for(browser, lambda d: "gone: r" in d.find_element(By.ID, "status").text, 15, "not shown as gone")
        assert severe(browser, allow_network=True) == []
        leave(browser)


# ---- the screenshot for docs/live.md ------------------------------------------------------

def screenshot(root: Path, output: Path, run: str | None, data_dir: Path) -> None:
    driver = start_browser(WIDTH, 1000)
    try:
        with serving(root, data_dir) as url:
            driver.get(url + (f"#run={run}" if run else ""))
            wait_for(driver, lambda d: data_points(d, "step-loss") > 0, 20, "no curve")
            wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 32, 20, "no filters")
            wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#misclassified canvas")) > 0, 60)
            for _ in range(3):  # the window as tall as the page (the frame around the page takes a little)
                height = driver.execute_script("return document.documentElement.scrollHeight")
                if driver.execute_script("return window.innerHeight") >= height:
                    break
                driver.set_window_size(WIDTH, height + driver.get_window_size()["height"]
                                       - driver.execute_script("return window.innerHeight"))
                time.sleep(0.5)
            draw_seven(driver)
            wait_for_prediction(driver)
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(0.5)
            errors = severe(driver)
            if errors:
                raise SystemExit(f"the page logged errors: {errors}")
            driver.save_screenshot(str(output))
            leave(driver)
    finally:
        driver.quit()
    if shutil.which("optipng"):  # lossless, about a quarter smaller
        subprocess.run(["optipng", "-quiet", "-o2", str(output)], check=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a screenshot of the live page over RUNS_DIR.")
    parser.add_argument("--screenshot", required=True, metavar="FILE.png")
    parser.add_argument("runs", metavar="RUNS_DIR")
    parser.add_argument("--run", help="the run to show (default: the page's choice, the newest)")
    parser.add_argument("--data-dir", default=str(ROOT / "datasets" / "mnist"))
    args = parser.parse_args()
    screenshot(Path(args.runs), Path(args.screenshot), args.run, Path(args.data_dir))
    print(f"saved {args.screenshot} ({os.path.getsize(args.screenshot):,} bytes)")
