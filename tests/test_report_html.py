"""report.html: a run's selections as a page that opens from disk, checked in headless Chromium (Debian's, driven
through its chromedriver by Selenium), and its size at 1,000 picks."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from almdn_ray import acquisition, scoring, storage
from almdn_ray.config import spec_from_dict
from almdn_ray.cycle import Driver, RunLayout, StageFunctions
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.data.manifest import read_manifest
from almdn_ray.model.embeddings import Embedder
from almdn_ray.report import write_report
from almdn_ray.report_html import MAX_BOXES, THUMBNAIL_BYTES, render_page, thumbnail

logger = logging.getLogger(__name__)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
]  # fmt: skip


class LocalStages:
    """The cycle's stages in this process, with a real model: TRAIN trains once (20 iterations on the first
    labelled set) and later cycles keep those weights; SCORE is the single-process scorer with embeddings;
    EVAL reports a rising made-up mAP (the page draws it; no test here is about its value)."""

    def __init__(self):
        self.weights: bytes | None = None
        self.evaluations = 0

    def train(self, records, spec, job, storage_uri, run_name, init):
        from almdn_ray.data.transforms import DetectionDataset, eval_transform
        from almdn_ray.training import LocalContext, train_worker

        if self.weights is None:
            torch.manual_seed(0)
            dataset = DetectionDataset(records, eval_transform(spec.input_size))
            model = train_worker(spec=spec, dataset=dataset, recipe=job.train, context=LocalContext())
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            self.weights = buffer.getvalue()
        storage.write_bytes(storage.join(storage_uri, "model.pt"), self.weights)
        return storage.join(storage_uri, "model.pt")

    def score(self, manifest, weights, out, spec, job, member_uris=()):
        model = scoring.load_model(spec, weights)
        embedder = Embedder(job.acquisition.embedding_dims, max_objects=scoring.MAX_OBJECT_EMBEDDINGS)
        table = scoring.score_table(
            model, read_manifest(manifest), config=job.acquisition.postprocess(), embedder=embedder
        )
        storage.write_parquet(storage.join(out, "part-0.parquet"), table)

    def evaluate(self, weights, dataset, spec, job):
        self.evaluations += 1
        return {"map_voc07": 0.1 * self.evaluations, "map_area": 0.12 * self.evaluations, "coco": {"AP": 0.05}}

    def functions(self) -> StageFunctions:
        return StageFunctions(train=self.train, score=self.score, evaluate=self.evaluate)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Three cycles (two selections of 12) on 60 demo images in scenes of two near-copies, written by the cycle
    driver with :class:`LocalStages`, and its report. min_confidence 0.3: most images get no detection from
    the briefly trained model, so the selections have random-fill picks. min_distance 0.27: in this model's
    embeddings the near-copies of a scene lie up to 0.24 apart, different scenes 0.30 and more."""
    root = tmp_path_factory.mktemp("report-html")
    demo = build_demo(
        root / "demo",
        pool_images=60,
        test_images=4,
        config=DemoConfig(image_size=64, digit_size=(20, 40), near_duplicates=1),
    )
    job = spec_from_dict(
        {
            "storage": {"uri": str(root / "run")},
            "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
            "model": {"image_size": 64},
            "train": {"max_iterations": 20, "batch_size": 4, "warmup_iterations": 4, "lr_steps": []}
            | {"precise_bn_batches": 2, "checkpoint_every": 100, "flip": False},
            "acquisition": {"initial_labeled": 10, "budget": 12, "cycles": 3, "min_confidence": 0.4}
            | {"max_per_class": 5, "embedding_dims": 64, "min_distance": 0.27},
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores: 20x slower
    try:
        assert Driver(job, LocalStages().functions()).run().status == "finished"
        write_report(str(root / "run"))
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def page_data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    start = text.index('<script type="application/json" id="report-data">') + len(
        '<script type="application/json" id="report-data">'
    )
    return json.loads(text[start : text.index("</script>", start)])


def expected_order(picks: list[dict], key: str) -> list[str]:
    """The page's order: descending by the key, picks without a value last, ties in selection order."""
    value = (lambda p: p["score"]) if key == "score" else (lambda p: p["terms"][key])
    return [p["id"] for p in sorted(picks, key=lambda p: (value(p) is None, -(value(p) or 0.0), p["rank"]))]


def test_the_page_data_agrees_with_the_selection_and_the_score_files(run):
    layout = RunLayout(str(run))
    data = page_data(run / "report" / "report.html")
    assert [s["cycle"] for s in data["selections"]] == [0, 1]
    assert any(p["unscored"] for s in data["selections"] for p in s["picks"])
    for view in data["selections"]:
        selected = storage.read_parquet(layout.cycle(view["cycle"], "selected.parquet")).to_pylist()
        scores = {r["image_id"]: r for r in scoring.read_scores(layout.cycle(view["cycle"], "scores")).to_pylist()}
        assert [p["id"] for p in view["picks"]] == [r["image_id"] for r in selected]
        assert view["detections"]
        for pick, row in zip(view["picks"], selected):
            assert pick["unscored"] == (not acquisition.is_scored(np.array([row["score"]]))[0])
            assert pick["thumb"].startswith("data:image/jpeg;base64,") and (pick["width"], pick["height"]) == (64, 64)
            # the report's own pass over the picks finds what SCORE found: the same detections, so the same
            # count, no detection exactly on the random-fill picks, and each term's maximum among the boxes kept
            assert pick["detections"] == scores[pick["id"]]["n_det"]
            assert (pick["detections"] == 0) == pick["unscored"] == (pick["labels"] == [])
            assert len(pick["boxes"]) <= min(pick["detections"], MAX_BOXES + 4)
            if pick["unscored"]:
                assert all(v is None for v in pick["terms"].values())
                continue
            for j, term in enumerate(acquisition.TERMS):
                best = max(box[6 + j] for box in pick["boxes"])
                assert best == pytest.approx(scores[pick["id"]][f"{term}_max"], rel=1e-3, abs=1e-6)
            assert max(pick["terms"].values()) == pytest.approx(row["score"], rel=1e-3, abs=1e-3)  # score = max z


def test_detections_are_kept_with_the_report_and_not_predicted_again(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = page_data(copy / "report" / "report.html")
    for model in (copy / "cycles").glob("*/train/model.pt"):
        model.unlink()  # a second report cannot predict: it reads report/selections/NNN.json
    paths = write_report(str(copy))
    after = page_data(Path(paths["html"]))
    assert after["selections"] == before["selections"]


def test_a_thousand_picks_make_a_page_under_20_mb(tmp_path):
    """1,000 picks of 160 px demo images (and of noise, the worst case for JPEG), 20 boxes each."""
    from PIL import Image

    demo = build_demo(tmp_path / "demo", pool_images=20, test_images=1, config=DemoConfig(image_size=160))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(demo["pool"].parent.glob("images/pool_*"))]
    noise = [np.random.default_rng(i).integers(0, 255, (160, 160, 3), dtype=np.uint8) for i in range(20)]
    rng = np.random.default_rng(0)
    for name, images in (("demo", photos), ("noise", noise)):
        thumbs = [thumbnail(image) for image in images]
        assert max(len(t) for t in thumbs) <= THUMBNAIL_BYTES * 4 / 3 + 64
        picks = []
        for i in range(1000):
            boxes = [
                [*np.round(rng.uniform(0, 160, 4), 1).tolist(), int(rng.integers(1, 11)), 0.734]
                + [float(f"{v:.4g}") for v in rng.uniform(0, 1, 4)]
                for _ in range(MAX_BOXES)
            ]
            picks.append(
                {
                    "id": f"pool/scene_{i:07d}.jpg", "rank": i, "score": 1.234, "unscored": False,
                    "terms": dict(zip(acquisition.TERMS, rng.normal(size=4).round(3).tolist())), "duplicate": None,
                    "thumb": thumbs[i % len(thumbs)], "width": 160, "height": 160, "boxes": boxes,
                    "detections": MAX_BOXES, "labels": sorted({b[4] for b in boxes}),
                }
            )  # fmt: skip
        selection = {"cycle": 0, "strategy": "almdn", "min_distance": 0.05, "detections": True}
        selection |= {"classes": [str(c) for c in range(10)], "picks": picks}
        page = render_page({"run_id": "size", "summary": "", "curve": None, "terms": list(acquisition.TERMS)}
                           | {"table": [], "selections": [selection]})  # fmt: skip
        size = len(page.encode("utf-8"))
        logger.info("report.html with 1,000 picks of %s thumbnails: %.1f MB", name, size / 1e6)
        print(f"report.html, 1,000 picks of {name} thumbnails: {size / 1e6:.1f} MB")
        assert size < 20e6


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert CHROMIUM and CHROMEDRIVER, "chromium or chromedriver missing: run tests/tools/install_chromium.sh"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_the_page_opens_from_disk_in_chromium_and_sorts_and_filters(run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = run / "report" / "report.html"
    data = page_data(page)
    browser.get(page.as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    screenshot = tmp_path / "report.png"  # the whole page, beyond the window
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    print(f"report.html: {page.stat().st_size / 1e3:.0f} kB; screenshot: {screenshot}")
    assert errors == []
    assert browser.find_element(By.ID, "curve").get_attribute("naturalWidth") != "0"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#cycle-table tbody tr")) == 3

    def shown(section) -> list[str]:
        cards = section.find_elements(By.CSS_SELECTOR, "figure.pick")
        return [c.get_attribute("data-id") for c in cards if c.is_displayed()]

    scenes_picked, random_fill, sorts_differ = set(), set(), False
    for view in data["selections"]:
        section = browser.find_element(By.CSS_SELECTOR, f"section.selection[data-cycle='{view['cycle']}']")
        picks = view["picks"]
        assert shown(section) == [p["id"] for p in picks]  # every pick, in selection order
        assert len(section.find_elements(By.CSS_SELECTOR, "svg rect.box")) == sum(len(p["boxes"]) for p in picks)
        marked = {c.get_attribute("data-id") for c in section.find_elements(By.CSS_SELECTOR, "figure.unscored")}
        assert marked == {p["id"] for p in picks if p["unscored"]}
        random_fill |= marked
        badges = section.find_elements(By.CSS_SELECTOR, ".badge.random-fill")
        assert len(badges) == len(marked)
        # the demo's scenes are pairs of near-copies (ids 1-2, 3-4, ...): a pick is marked when its twin is picked
        scene = {p["id"]: (int(p["id"]) - 1) // 2 for p in picks}
        twins = {i for i in scene if list(scene.values()).count(scene[i]) == 2}
        duplicates = {c.get_attribute("data-id") for c in section.find_elements(By.CSS_SELECTOR, "figure.duplicate")}
        assert duplicates == twins
        scenes_picked |= twins
        for key in ("score", *acquisition.TERMS):
            section.find_element(By.CSS_SELECTOR, f"button[data-sort='{key}']").click()
            assert shown(section) == expected_order(picks, key), key
        sorts_differ |= expected_order(picks, "cls_al") != expected_order(picks, "loc_al")
        counts = {}
        for p in picks:
            for label in p["labels"]:
                counts[label] = counts.get(label, 0) + 1
        label = min(counts, key=lambda c: (counts[c], c))  # a class only some picks have
        Select(section.find_element(By.CSS_SELECTOR, "select.class-filter")).select_by_value(str(label))
        order = expected_order(picks, acquisition.TERMS[-1])
        with_class = [i for i in order if label in next(p["labels"] for p in picks if p["id"] == i)]
        assert shown(section) == with_class and 0 < len(with_class) < len(picks)
        Select(section.find_element(By.CSS_SELECTOR, "select.class-filter")).select_by_value("none")
        assert set(shown(section)) == {p["id"] for p in picks if not p["labels"]}
        Select(section.find_element(By.CSS_SELECTOR, "select.class-filter")).select_by_value("")
        assert len(shown(section)) == len(picks)
    assert scenes_picked and random_fill and sorts_differ  # so each check above had something to check
    box = browser.find_element(By.CSS_SELECTOR, "section.selection figure.pick:not(.unscored) rect.box:last-child")
    browser.execute_script("arguments[0].scrollIntoView()", box)
    box.click()
    detail = box.find_element(By.XPATH, "ancestor::figure").find_element(By.CSS_SELECTOR, ".detail").text
    assert " · loc al " in detail and " · cls al " in detail
    browser.execute_script("console.error('probe')")  # the console check above can see an error
    assert any("probe" in entry["message"] for entry in browser.get_log("browser"))


@pytest.mark.skipif(not os.environ.get("ALMDN_REPORT_HTML"), reason="set ALMDN_REPORT_HTML to a run's report.html")
def test_a_given_runs_page_opens_sorts_and_filters(browser):
    """Any run's report.html (the quickstart's: ALMDN_REPORT_HTML=runs/quickstart/report/report.html): no console
    error, every selection with all its picks, each sort in the data's order, a class filter keeps its picks."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = Path(os.environ["ALMDN_REPORT_HTML"]).resolve()
    data = page_data(page)
    browser.get(page.as_uri())
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    sections = browser.find_elements(By.CSS_SELECTOR, "section.selection")
    assert len(sections) == len(data["selections"]) > 0
    print(f"{page}: {page.stat().st_size / 1e6:.2f} MB, {len(sections)} selections")
    for view, section in zip(data["selections"], sections):
        picks = view["picks"]

        def shown(section=section) -> list[str]:
            cards = section.find_elements(By.CSS_SELECTOR, "figure.pick")
            return [c.get_attribute("data-id") for c in cards if c.is_displayed()]

        assert shown() == [p["id"] for p in picks]
        for key in ("score", *acquisition.TERMS):
            section.find_element(By.CSS_SELECTOR, f"button[data-sort='{key}']").click()
            assert shown() == expected_order(picks, key), key
        labels = sorted({label for p in picks for label in p["labels"]})
        if labels:
            Select(section.find_element(By.CSS_SELECTOR, "select.class-filter")).select_by_value(str(labels[0]))
            assert set(shown()) == {p["id"] for p in picks if labels[0] in p["labels"]}
            Select(section.find_element(By.CSS_SELECTOR, "select.class-filter")).select_by_value("")
        print(f"  cycle {view['cycle']}: {len(picks)} picks, {sum(len(p['boxes']) for p in picks)} boxes drawn")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
