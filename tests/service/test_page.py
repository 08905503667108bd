"""The page at ``/`` in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium) against a real ``unet-tile serve`` of the bundled demo model on 127.0.0.1.

Skipped where Chromium, its driver or selenium is missing, unless ``UNET_REQUIRE_BROWSER=1``
(``.ci/run`` sets it after installing them): then a missing browser fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from service.paths import default_checkpoint
from unet.synth import synth_image

Server = Any

CHROMIUM = os.environ.get("UNET_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = os.environ.get("UNET_TEST_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
KEY = "s3cret-key-for-the-page"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    for what, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER)):
        if not os.access(path, os.X_OK):
            return f"{what} not found at {path} (apt install chromium chromium-driver)"
    return None


_WHY = _missing()
if _WHY is not None:
    if os.environ.get("UNET_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser tests required (UNET_REQUIRE_BROWSER=1) but {_WHY}")
    pytest.skip(_WHY, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic widefield image of nuclei, twice the viewer's size so it opens zoomed out."""
    path = tmp_path_factory.mktemp("img") / "nuclei.tif"
    sample = synth_image(np.random.default_rng(7), (1536, 2048), dtype="uint16")
    tifffile.imwrite(path, sample.image, compression="zlib")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], tuple[WebDriver, Path]]]:
    """``browser()``: a fresh headless Chromium with its own profile and download folder."""
    opened: list[WebDriver] = []

    def _open() -> tuple[WebDriver, Path]:
        downloads = tmp_path_factory.mktemp("downloads")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",  # this machine has no internet: nothing to look up
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
        ):
            options.add_argument(arg)
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # an explicit driver: nothing downloaded
        driver.set_script_timeout(30)
        opened.append(driver)
        return driver, downloads

    yield _open
    for d in opened:
        d.quit()


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    return launch(default_checkpoint(), jobs_dir=str(tmp_path_factory.mktemp("jobs")), device="cpu")


@pytest.fixture(scope="module")
def keyed(launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    return launch(default_checkpoint(), jobs_dir=str(tmp_path_factory.mktemp("jobs")), device="cpu", api_key=KEY)


def drop(driver: WebDriver, path: Path) -> None:
    """Drop ``path`` on the drop zone as a person does: a drop event whose DataTransfer holds the file."""
    picker = driver.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-drop-source';"
        " i.style.display = 'none'; document.body.appendChild(i); return i;"
    )
    picker.send_keys(str(path))
    driver.execute_script(
        "const files = document.getElementById('test-drop-source').files; const dt = new DataTransfer();"
        " for (const f of files) dt.items.add(f);"
        " const zone = document.getElementById('drop');"
        " zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));"
        " zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));"
        " document.getElementById('test-drop-source').remove();"
    )


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 120) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def overlay_pixels(driver: WebDriver) -> int:
    """Canvas pixels in the nucleus class's colour (230, 25, 75), blended at the page's opacity."""
    return int(
        driver.execute_script(
            "const c = document.getElementById('canvas'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            " for (let i = 0; i < d.length; i += 4) if (d[i] > d[i + 1] + 60 && d[i] > d[i + 2] + 30) n++; return n;"
        )
    )


def downloaded(folder: Path, name: str, timeout: float = 30) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = folder / name
        if path.is_file() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} never arrived in {folder}: {sorted(p.name for p in folder.iterdir())}")


def cli_mask(src: Path, out: Path) -> np.ndarray[Any, Any]:
    """What ``unet-tile segment`` writes for the same file, with the server's precision."""
    subprocess.run(
        [sys.executable, "-m", "service.cli", "segment", str(src), "-o", str(out), "--precision", "fp32", "-q"],
        cwd=REPO,
        check=True,
    )
    return np.asarray(tifffile.imread(out))


def test_drop_a_tiff_see_the_overlay_and_download_the_cli_mask(
    server: Server, browser: Callable[[], tuple[WebDriver, Path]], nuclei: Path, tmp_path: Path
) -> None:
    driver, downloads = browser()
    driver.get(server.url + "/")
    wait(driver, lambda d: d.find_element(By.ID, "model").text.startswith("Model "))
    drop(driver, nuclei)
    card = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#jobs li[data-state]"))
    wait(driver, lambda d: d.find_element(By.ID, "canvas").get_attribute("data-state") == "ready")
    assert card.get_attribute("data-state") == "done", card.text
    assert card.find_element(By.CSS_SELECTOR, "progress.upload").get_attribute("value") == "1"
    assert card.find_element(By.CSS_SELECTOR, "progress.segment").get_attribute("value") == "1"
    canvas = driver.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-level") == "1"  # 2048 px wide in a ~960 px canvas: the half-size level
    outlined = overlay_pixels(driver)
    assert outlined > 1000, "the outlines are drawn over the image"
    driver.find_element(By.ID, "show-mask").click()  # off: the image alone
    wait(driver, lambda d: overlay_pixels(d) < outlined / 20)
    driver.find_element(By.ID, "show-mask").click()
    canvas.send_keys("+", "+", "+")  # zoom in from the keyboard: the full-resolution tiles come
    wait(driver, lambda d: d.find_element(By.ID, "canvas").get_attribute("data-level") == "0")
    wait(driver, lambda d: d.find_element(By.ID, "canvas").get_attribute("data-state") == "ready")
    canvas.send_keys(Keys.ARROW_LEFT, "0")
    driver.find_element(By.ID, "download-result").click()
    got = tifffile.imread(downloaded(downloads, "nuclei_mask.tif"))
    np.testing.assert_array_equal(got, cli_mask(nuclei, tmp_path / "cli.tif"))
    assert set(np.unique(got)) <= {0, 1, 2} and (got == 1).mean() > 0.05
    logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert logs == [], logs


def test_a_corrupt_file_shows_the_servers_message(
    server: Server, browser: Callable[[], tuple[WebDriver, Path]], tmp_path: Path
) -> None:
    corrupt = REPO / "tests" / "data" / "corrupt" / "truncated-stack-check-compression-500.tif"
    expected = server.post("/jobs", content=corrupt.read_bytes(), headers={"Content-Type": "image/tiff"})
    assert 400 <= expected.status_code < 500, expected.text
    detail = expected.json()["detail"]
    driver, _ = browser()
    driver.get(server.url + "/")
    driver.find_element(By.ID, "files").send_keys(str(corrupt))
    card = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#jobs li[data-state='failed']"))
    assert card.find_element(By.CSS_SELECTOR, ".error").text == detail
    assert driver.find_element(By.ID, "viewer").get_attribute("hidden") is not None


def test_with_an_api_key_the_page_shows_401_then_works_once_it_is_entered(
    keyed: Server, browser: Callable[[], tuple[WebDriver, Path]], tmp_path: Path
) -> None:
    expected = keyed.get("/model").json()["detail"]
    image = tmp_path / "small.tif"
    tifffile.imwrite(image, synth_image(np.random.default_rng(3), (400, 500), dtype="uint16").image)
    driver, downloads = browser()
    driver.get(keyed.url + "/")
    wait(driver, lambda d: d.find_element(By.ID, "model").text == expected)
    driver.find_element(By.ID, "files").send_keys(str(image))
    card = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#jobs li[data-state='failed']"))
    assert card.find_element(By.CSS_SELECTOR, ".error").text == expected
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(KEY, Keys.TAB)  # the change event: the key is kept in this tab's session
    wait(driver, lambda d: d.find_element(By.ID, "model").text.startswith("Model "))
    assert driver.execute_script("return sessionStorage.getItem('unet-tile.api-key')") == KEY
    driver.find_element(By.ID, "output").send_keys("instances")
    driver.find_element(By.ID, "files").send_keys(str(image))
    wait(driver, lambda d: d.find_element(By.ID, "canvas").get_attribute("data-state") == "ready")
    count = driver.find_element(By.ID, "count").text
    job = keyed.get(
        f"/jobs/{driver.find_elements(By.CSS_SELECTOR, '#jobs li[data-job]')[-1].get_attribute('data-job')}",
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    assert count == f"{job['objects']} objects" and job["objects"] > 5
    driver.find_element(By.ID, "download-table").click()
    table = downloaded(downloads, "small_objects.csv").read_text().splitlines()
    assert len(table) == job["objects"] + 1 and table[0].startswith("id,")
    driver.refresh()  # the key stays for the tab's session
    wait(driver, lambda d: d.find_element(By.ID, "model").text.startswith("Model "))
