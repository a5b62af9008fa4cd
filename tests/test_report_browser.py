"""The demo report as a person sees it: ``index.html`` of a smoke run (``spinemm demo --quick``)
rendered by headless Chromium.

The page is served over HTTP from its folder (so a script may read its images' pixels) with a
check script appended; after the page's load event the script records, for every ``<img>``,
whether it loaded, its size on screen and how much of it differs from its background, and the
page's visible text. The test reads that record from the dumped DOM.

Chromium is Debian's ``chromium`` package, which ``.ci/run`` installs; where none can be found
the test is skipped with a loud message, never silently passed.
"""

from __future__ import annotations

import html
import http.server
import json
import math
import re
import shutil
import subprocess
import threading
import warnings
from functools import partial
from pathlib import Path

import pytest

from spinemm.demo import run_demo

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
NO_CHROMIUM = ("NO CHROMIUM: the report was NOT checked in a browser. Install Debian's chromium "
               "(`apt-get install -y chromium`; .ci/run does) to run tests/test_report_browser.py")

#: Appended to the page: after load, every image's state and the visible text, as JSON in <pre id=check>.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const text = document.body.innerText;  // before the record is added
  const images = Array.from(document.images).map((img) => {
    const box = img.getBoundingClientRect();
    let busy = 0;
    if (img.complete && img.naturalWidth > 0) {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const g = canvas.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, canvas.width, canvas.height).data;
      let differ = 0;  // pixels unlike the top-left (background) one
      for (let i = 0; i < d.length; i += 4) {
        if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 24) differ++;
      }
      busy = differ / (d.length / 4);
    }
    return {src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight, shown: [box.width, box.height], busy: busy};
  });
  const pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify({images: images, text: text});
  document.body.appendChild(pre);
});
</script>"""

#: Parts of metrics.json that are not metrics (the test's own list, not the report's).
SKIPPED = {"settings", "seconds", "step_seconds", "model_dir", "smoke_run"}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> Path:
    """The report folder of one ``spinemm demo --quick`` run (a few seconds); skipped, loudly,
    before the run where there is no Chromium to read it."""
    if CHROMIUM is None:
        warnings.warn(NO_CHROMIUM, stacklevel=1)
        pytest.skip(NO_CHROMIUM)
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True)
    return out / "report"


def _metrics(value, name: str = ""):
    """(dotted name, number) of every number in metrics.json, lists (curves, matrices) left out."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not name and key in SKIPPED:
                continue
            yield from _metrics(item, f"{name}.{key}" if name else key)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield name, float(value)


def _render(report: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """The check record of ``report/index.html`` in headless Chromium, and every path the page asked for
    that the server did not have."""
    page = (report / "index.html").read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>")
    missing: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/__check__.html":
                body = page.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.path != "/favicon.ico" and not Path(self.translate_path(self.path)).is_file():
                missing.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(report)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/__check__.html"
        done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000",
                               "--virtual-time-budget=10000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium gave no check record (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1))), missing


@pytest.mark.slow
def test_the_report_reads_right_in_a_browser(smoke_report, tmp_path):
    page = (smoke_report / "index.html").read_text(encoding="utf-8")
    referenced = re.findall(r'(?:src|href)="([^"#:]+)"', page)
    assert referenced and all((smoke_report / html.unescape(name)).is_file() for name in referenced), referenced
    record, missing = _render(smoke_report, tmp_path)
    assert missing == []

    # every picture loaded, is on screen at a readable size, and is not blank
    images = record["images"]
    assert sorted(i["src"] for i in images) == sorted(n for n in referenced if n.endswith(".png"))
    assert {"stage_curves.png", "confusion_matrix.png", "grader_attention.png"} <= {i["src"] for i in images}
    assert sum(i["src"].startswith("study_") for i in images) == 2  # a held-out and a validation study
    for image in images:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
        assert image["shown"][0] > 200 and image["shown"][1] > 100, image
        assert image["busy"] > 0.02, f"{image['src']} is (nearly) blank: {image['busy']:.2%} of it drawn"

    # every metric of metrics.json is on the page, with its value
    text = record["text"]
    lines = text.splitlines()
    metrics = dict(_metrics(json.loads((smoke_report / "metrics.json").read_text())))
    assert len(metrics) > 100
    for name, value in metrics.items():
        row = next((line for line in lines if line.split("\t")[0] == name), None)
        assert row is not None, f"metric {name} is not shown"
        assert math.isclose(float(row.split("\t")[1]), value, rel_tol=1e-3, abs_tol=1e-4), (row, value)
        if name.endswith("balanced_accuracy") and value < 1 / 3 - 1e-9:
            assert "below chance" in row, row

    # which way is better beside the scores; a smoke run says it is one
    score_row = next(line for line in lines if line.startswith("Official RSNA score"))
    assert "lower is better" in score_row
    assert "higher is better" in next(line for line in lines if line.startswith("zero-shot balanced accuracy"))
    assert "Smoke run" in text and "are expected here" in text
    assert text.index("Smoke run") < text.index("Held-out score")
