"""The QC page (``report.html``): its content, escaping, self-containment, and a real browser.

The browser test runs ``nidask estimate`` on a small phantom and opens the page in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by selenium):
it is not skipped when they are missing, it fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

import nidask
from nidask.reporting import html as qc

SRC = Path(__file__).resolve().parents[1] / "src"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&"\''

OUTLIERS = [
    {"volume": 3, "slice": 5, "score": 4.2, "replaced": True},
    {"volume": 7, "slice": 2, "score": 3.1, "replaced": False},
]
EDDY = {
    "phase_encoding": "j",
    "columns": ["x", "y", "z", "constant"],
    "coefficients": [[0.01 * i, 0.002, -0.001, 0.5] for i in range(10)],
}


class Elements(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def images(self) -> dict[str, str]:
        """``alt`` -> ``src`` of every ``<img>``."""
        return {a.get("alt", ""): a.get("src", "") for t, a in self.tags if t == "img"}


def png_size(uri: str) -> tuple[int, int]:
    """Width and height of a ``data:image/png;base64,`` image (from its IHDR chunk)."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture
def moved(dwi_phantom):
    """The DWI phantom as opened, and the same with its true motion as the estimate."""
    dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    yield dwi, dwi.with_whole_motion(dwi_phantom.motion)
    dwi.close()


def base_report(n: int, **extra) -> dict:
    volumes = [{"index": i, "similarity": 0.9, "flags": []} for i in range(n)]
    volumes[4]["flags"] = ["poor_fit"]
    return {"passes": [{}], "volumes": volumes, "flags": [], **extra}


# -- content ------------------------------------------------------------------------------
def test_sections_and_outlier_map(moved):
    raw, estimated = moved
    n = len(estimated.whole_series())
    report = base_report(n, outliers=OUTLIERS, eddy_currents=EDDY)
    report["quality"] = {"shells": [{"bval": 1000.0, "volumes": 8, "cnr": 2.5}]}
    page = qc.report_html(raw, estimated, report, {"model": "average"}, title="dwi")
    elements = Elements(page)
    ids = [a["id"] for t, a in elements.tags if t == "section"]
    assert ids == list(qc.SECTIONS)
    images = elements.images()
    # the outlier map is a real image, beside the motion, mosaic and eddy figures
    for alt in ("outlier map", "motion parameters", "mosaic", "eddy-current"):
        (uri,) = [src for name, src in images.items() if alt in name]
        width, height = png_size(uri)
        assert width > 100 and height > 100, alt
    assert "2 outlier slice(s) in 2 volume(s), 1 replaced" in page
    assert "<td>poor_fit</td>" in page and "phase-encoding axis: j" in page
    assert "<td>average</td>" in page and "temporal SNR of the 2 b=0 volumes" in page


def test_outliers_absent_or_none(moved):
    raw, estimated = moved
    n = len(estimated.whole_series())
    empty = qc.report_html(raw, estimated, base_report(n, outliers=[]))
    off = qc.report_html(raw, estimated, base_report(n))
    assert "no outlier slices" in empty and "outlier detection off" not in empty
    assert "outlier detection off" in off and "no outlier slices" not in off
    for page in (empty, off):
        assert not [alt for alt in Elements(page).images() if "outlier" in alt]
        assert "eddy currents not estimated" in page and "settings not recorded" in page


def test_hostile_text_is_escaped(moved, tmp_path):
    raw, estimated = moved
    n = len(estimated.whole_series())
    report = base_report(n, outliers=OUTLIERS)
    report["flags"] = [HOSTILE]
    report["volumes"][1]["flags"] = [HOSTILE]
    report["eddy_currents"] = {**EDDY, "phase_encoding": HOSTILE, "columns": [HOSTILE] * 4}
    settings = {HOSTILE: HOSTILE, "nested": {"a": HOSTILE}}
    page = qc.report_html(raw, estimated, report, settings, title=HOSTILE)
    elements = Elements(page)
    tags = {t for t, _ in elements.tags}
    assert "script" not in tags
    assert not [a for _, attrs in elements.tags for a in attrs if a.startswith("on")]
    assert [a.get("src", "")[:5] for t, a in elements.tags if t == "img"] == ["data:"] * 4
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    index = qc.write_index_html(
        tmp_path / "index.html",
        [{"name": HOSTILE, "report": None, "status": HOSTILE, "message": HOSTILE}],
        title=HOSTILE,
    )
    text = Path(index).read_text()
    assert "script" not in {t for t, _ in Elements(text).tags}
    assert "&lt;script&gt;" in text


#: Attributes that make a browser fetch or link something.
SOURCE_ATTRIBUTE = re.compile(
    r"\b(?:src|href|srcset|action|data|poster)\s*=\s*[\"']([^\"']*)", re.I
)


def test_page_is_self_contained(moved, tmp_path):
    raw, estimated = moved
    n = len(estimated.whole_series())
    path = qc.write_report_html(
        tmp_path / "report.html",
        raw,
        estimated,
        base_report(n, outliers=OUTLIERS, eddy_currents=EDDY),
        {"model": "average"},
    )
    page = Path(path).read_text(encoding="utf-8")
    references = SOURCE_ATTRIBUTE.findall(page)
    assert references  # the images and the table of contents
    for value in references:
        assert value.startswith(("data:", "#")), value[:60]
    text = re.sub(r"data:[^\"']*", "", page)  # base64 holds "//" too
    assert not re.search(r"https?:|//", text, re.I)
    assert not re.search(r"<script|<link[^>]*stylesheet|@import|url\(", page, re.I)


def test_page_without_matplotlib(moved, monkeypatch):
    raw, estimated = moved
    monkeypatch.setattr(qc, "figures_available", lambda: False)
    n = len(estimated.whole_series())
    page = qc.report_html(raw, estimated, base_report(n, outliers=OUTLIERS, eddy_currents=EDDY))
    assert not Elements(page).images()
    assert "figures left out: matplotlib is not installed" in page
    assert "every outlier slice" in page and "coefficients of every volume" in page


def test_pet_page_without_a_report(pet_phantom):
    with nidask.load(pet_phantom.image, **pet_phantom.companions) as pet:
        page = qc.report_html(pet, pet.with_whole_motion(pet_phantom.motion), title="pet")
    assert [a["id"] for t, a in Elements(page).tags if t == "section"] == list(qc.SECTIONS)
    assert "no quality measures for this series" in page and "no volume flagged" in page
    assert len(Elements(page).images()) == 2  # motion and mosaic


def test_b0_snr_measures():
    rng = np.random.default_rng(0)
    shape = (10, 10, 6)
    mask = np.zeros(shape, bool)
    mask[2:8, 2:8, 1:5] = True
    series = 100.0 + 10.0 * rng.standard_normal((*shape, 40))
    dwi = type("B0s", (), {"b0s": da.from_array(series, chunks=(*shape, 8)), "brainmask": mask})
    temporal = qc.b0_snr(dwi)
    assert temporal["kind"] == "temporal" and temporal["volumes"] == 40
    assert 9 < temporal["value"] < 11  # 100 / 10
    image = np.where(mask, 100.0, 0.0) + 5.0 * rng.standard_normal(shape)
    single = type("B0", (), {"b0s": da.from_array(image[..., None]), "brainmask": mask})
    background = qc.b0_snr(single)
    assert background["kind"] == "background" and 17 < background["value"] < 23  # 100 / 5
    assert qc.b0_snr(type("None", (), {"b0s": None, "bzero": None, "brainmask": None})) is None


def test_index_links_are_relative(tmp_path):
    page = tmp_path / "sub-01" / "dwi" / "sub-01_desc-hmc_report.html"
    page.parent.mkdir(parents=True)
    page.write_text("<!DOCTYPE html>")
    index = qc.write_index_html(
        tmp_path / "report.html",
        [
            {"name": "sub-01/dwi/sub-01_dwi.nii.gz", "report": page, "status": "done"},
            {"name": "sub-02/dwi/sub-02_dwi.nii", "report": None, "status": "failed"},
        ],
    )
    links = [a["href"] for t, a in Elements(Path(index).read_text()).tags if t == "a"]
    assert links == ["sub-01/dwi/sub-01_desc-hmc_report.html"]
    assert "failed" in Path(index).read_text()


# -- the command line and a real browser --------------------------------------------------
def _nidask(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-m", "nidask", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for program in (CHROMIUM, CHROMEDRIVER):
        assert os.access(program, os.X_OK), f"{program} missing: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1024")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


#: Every attribute of every element, and every resource the page loaded over the network.
PAGE_FACTS = """
const values = [];
for (const element of document.querySelectorAll("*")) {
  for (const attribute of element.attributes) values.push(attribute.value);
}
return {
  values: values,
  images: Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth]),
  sections: Array.from(document.querySelectorAll("section[id]"), s => s.id),
  titles: Array.from(document.querySelectorAll("section h2"), h => h.textContent),
  resources: performance.getEntriesByType("resource").map(r => r.name),
};
"""


def _check_in_browser(driver, page: Path, images: int) -> dict:
    driver.get(page.as_uri())
    facts = driver.execute_script(PAGE_FACTS)
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    assert len(facts["images"]) == images, facts["images"]
    for alt, complete, width in facts["images"]:
        assert complete and width > 0, alt  # decoded by the browser
    assert facts["sections"] == list(qc.SECTIONS)
    assert facts["titles"] == list(qc.SECTIONS.values())
    assert not [v for v in facts["values"] if re.search(r"https?:", v, re.I)]
    assert not [r for r in facts["resources"] if not r.startswith("data:")]
    return facts


@pytest.mark.timeout(120)
def test_report_in_a_real_browser(dwi_phantom, tmp_path):
    out = tmp_path / "out"
    c = dwi_phantom.companions
    result = _nidask(
        "estimate", dwi_phantom.image, "--bvec", c["bvec_file"], "--bval", c["bval_file"],
        "--mask", c["brainmask_file"], "--out", out, "--model", "average", "--passes", "1",
        "--outliers", "off", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = out / "report.html"
    assert page.is_file() and "report.html" in result.stdout
    text = page.read_text(encoding="utf-8")
    assert "outlier detection off" in text and "<td>average</td>" in text  # the CLI settings
    # a page with every optional section filled in, from the same series
    with nidask.load(dwi_phantom.image, **c) as raw:
        estimated = raw.with_whole_motion(dwi_phantom.motion)
        n = len(estimated.whole_series())
        full = qc.write_report_html(
            tmp_path / "full.html",
            raw,
            estimated,
            base_report(n, outliers=OUTLIERS, eddy_currents=EDDY),
        )
    driver = _chromium()
    try:
        _check_in_browser(driver, page, images=2)  # motion and mosaic
        _check_in_browser(driver, Path(full), images=4)  # + eddy currents, outlier map
    finally:
        driver.quit()


@pytest.mark.timeout(180)
def test_bids_run_writes_an_index(dwi_phantom, tmp_path):
    raw = tmp_path / "raw"
    folder = raw / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    (raw / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0"})
    )
    shutil.copy(dwi_phantom.image, folder / "sub-01_dwi.nii")
    shutil.copy(dwi_phantom.companions["bval_file"], folder / "sub-01_dwi.bval")
    shutil.copy(dwi_phantom.companions["bvec_file"], folder / "sub-01_dwi.bvec")
    out = tmp_path / "derivatives"
    result = _nidask("estimate", raw, out, "participant", "--passes", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    series_page = out / "sub-01" / "dwi" / "sub-01_desc-hmc_report.html"
    assert series_page.is_file()
    index = (out / "report.html").read_text(encoding="utf-8")
    links = [a["href"] for t, a in Elements(index).tags if t == "a"]
    assert links == ["sub-01/dwi/sub-01_desc-hmc_report.html"]
    assert 'id="settings"' in series_page.read_text(encoding="utf-8")
