"""Redraw the README's screenshots of the web viewer and the HTML report in headless Chromium.

    python docs/screenshots.py --viewer-run RUN --report-run RUN [--data PATH]

The viewer is served in-process on loopback; the report is written to a temporary directory and
opened from disk. Needs /usr/bin/chromium and /usr/bin/chromedriver.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.report import write_report  # noqa: E402
from inkfill.serve import LiveServer, create_app  # noqa: E402


def chromium(width: int, height: int, profile: str):
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--hide-scrollbars",
                 f"--window-size={width},{height}", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    service = webdriver.ChromeService("/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=opts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--viewer-run", type=Path, required=True)
    p.add_argument("--report-run", type=Path, required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--writer", default=None, help="the viewer's writer (default: first with gaps)")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args()
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp:
        driver = chromium(1200, 1000, f"{tmp}/profile")
        try:
            with LiveServer(create_app(args.viewer_run, args.data)) as base:
                driver.get(base + "/")
                time.sleep(2)
                if args.writer:
                    box = driver.find_element(By.ID, "writer")
                    box.clear()
                    box.send_keys(args.writer)
                    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
                    time.sleep(2)
                driver.find_element(By.ID, "generate").click()
                time.sleep(3)
                driver.save_screenshot(str(args.out / "viewer.png"))
            report = Path(tmp) / "report"
            write_report(args.report_run, report, args.data, per_page=20)
            driver.set_window_size(1200, 1100)
            driver.get((report / "index.html").as_uri())
            time.sleep(2)
            driver.save_screenshot(str(args.out / "report.png"))
        finally:
            driver.quit()
    print(f"wrote {args.out / 'viewer.png'} and {args.out / 'report.png'}")


if __name__ == "__main__":
    main()
