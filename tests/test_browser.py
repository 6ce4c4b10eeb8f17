"""End to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium), on
the real FEMNIST digits: the web viewer (`inkfill serve`) and the static report (`inkfill
report`), clicked through as a user would."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_serve import png_bytes

from inkfill.cli import main
from inkfill.data import WriterMatrix, load_dataset
from inkfill.methods.baselines import Retrieval
from inkfill.serve import LiveServer, create_app

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them as root)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,1600",
                 f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from conftest import REAL_DIGITS

    if not REAL_DIGITS.exists():
        pytest.skip(f"real FEMNIST not found at {REAL_DIGITS} (needs ../shared/data)")
    root = tmp_path_factory.mktemp("real")
    data = load_dataset(REAL_DIGITS)
    matrix = WriterMatrix(data)
    Retrieval().fit(matrix).save(root / "run", extra={"data": {"path": str(REAL_DIGITS)}})
    return root / "run", data, matrix


def wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def loaded(driver, css):
    return driver.execute_script(
        "const im = document.querySelectorAll(arguments[0]);"
        "return im.length > 0 && [...im].every((i) => i.complete && i.naturalWidth > 0);",
        css,
    )


def test_viewer_in_chromium(browser, real_run, tmp_path):
    from selenium.webdriver.common.by import By

    run, data, matrix = real_run
    with LiveServer(create_app(run)) as base:
        browser.get(base + "/")
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        writer = browser.find_element(By.ID, "writer").get_attribute("value")
        assert writer == str(matrix.writer_ids[0])
        wait(browser, lambda d: loaded(d, "#real img.real"))  # the writer's real cells

        # A writer with an empty cell: type it, pick the empty label, generate with a seed.
        r = int(np.flatnonzero(~matrix.observed.all(1))[0])
        writer, label = str(matrix.writer_ids[r]), int(np.flatnonzero(~matrix.observed[r])[0])
        box = browser.find_element(By.ID, "writer")
        box.clear()
        box.send_keys(writer)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
        wait(browser, lambda d: f"{label}" in d.find_element(By.ID, "cells-info").text)
        browser.find_element(By.CSS_SELECTOR, f"#label option[value='{label}']").click()
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("7")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: loaded(d, "#generated"))
        caption = browser.find_element(By.ID, "generated-caption").text
        assert f"writer {writer}, label {label}, seed 7" in caption
        browser.save_screenshot(str(tmp_path / "viewer.png"))

        # A bad n is refused with the server's message, shown on the page.
        n = browser.find_element(By.ID, "n")
        n.clear()
        n.send_keys("1000")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: "n must be between" in d.find_element(By.ID, "error").text)

        # A new writer: upload three of a real writer's images, fill their missing labels.
        n.clear()
        n.send_keys("8")
        mine = data.writers == data.writers[0]
        paths, labels = [], []
        for v in np.unique(data.labels[mine])[:3]:
            path = tmp_path / f"upload_{v}.png"
            path.write_bytes(png_bytes(data.images[mine & (data.labels == v)][0], invert=True))
            paths.append(str(path))
            labels.append(str(v))
        browser.find_element(By.ID, "files").send_keys("\n".join(paths))
        browser.find_element(By.ID, "file-labels").send_keys(",".join(labels))
        browser.find_element(By.ID, "fill-new").click()
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#new-results img")) == 7)
        wait(browser, lambda d: loaded(d, "#new-results img.new"))
        assert browser.find_element(By.ID, "error").text == ""


def test_report_in_chromium_from_disk(browser, real_run, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    run, _, matrix = real_run
    out = tmp_path / "report"
    assert main(["report", "--run", str(run), "--out", str(out), "--per-page", "40"]) == 0
    assert "516 writers" in capsys.readouterr().out
    pages = sorted((out / "matrix").glob("page_*.png"))
    assert len(pages) == 13  # 516 writers, 40 per page
    browser.get((out / "index.html").as_uri())
    rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#matrix tr td.writer"))
    assert len(rows) == 40
    assert "page 1 of 13" in browser.find_element(By.ID, "pageinfo").text
    n_filled = len(browser.find_elements(By.CSS_SELECTOR, "#matrix .cell.F"))
    first_page_rows = slice(0, 40)
    assert n_filled == int((~matrix.observed[first_page_rows]).sum())
    browser.find_element(By.ID, "next").click()
    assert "page 2 of 13" in browser.find_element(By.ID, "pageinfo").text
    # Search: one writer, found wherever its page is.
    target = str(matrix.writer_ids[500])
    browser.find_element(By.ID, "search").send_keys(target)
    hits = browser.find_elements(By.CSS_SELECTOR, "#matrix tr.hit td.writer")
    assert [h.text for h in hits] == [target]
    # The sprite sheets load from disk (file://, no server).
    ok = browser.execute_script(
        "const im = new Image(); im.src = 'matrix/page_0012.png';"
        "return new Promise((res) => { im.onload = () => res(im.naturalWidth); "
        "im.onerror = () => res(0); });"
    )
    assert ok == 28 * 10
    shutil.rmtree(out)
