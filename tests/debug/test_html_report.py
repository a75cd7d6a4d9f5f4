"""The HTML report (quanta report --html), rendered by a real headless Chromium."""

import re
import shutil
import subprocess

import numpy as np
import pytest

import quanta
from quanta.capture.record import capture
from quanta.cli import main
from quanta.debug.html import write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                    "(bash scripts/setup.sh test installs it when run as root)")


def _chromium(*args: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@needs_chromium
def test_html_report_renders_in_headless_chromium(mnist_debug, tmp_path):
    from PIL import Image

    model, qmodel, images, _ = mnist_debug
    result = quanta.debug.compare(model, qmodel, images[:100], show_progress=False)
    record = capture(model, images[:1])
    page = write_html(tmp_path / "report.html", quanta.report(qmodel), result, record, title="MNIST CNN")
    text = page.read_text()
    assert "<script" not in text and not re.search(r"(src|href)=\"?https?:", text)  # self-contained

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1400, 1000)
    assert pixels.std() > 20.0  # not a blank page
    colours = {tuple(p) for p in pixels[::4, ::4].reshape(-1, 3).astype(int)}
    assert (198, 40, 40) in colours and (21, 101, 192) in colours  # the isolated and accumulated bars

    dom = _chromium("--dump-dom", page.as_uri())
    rows = re.findall(r'<tr class="site-row" data-site="([^"]+)"', dom)
    assert rows == [s.name for s in result.sites] and len(rows) == 10
    assert len(re.findall(r'<tr class="layer-row"', dom)) == len(quanta.report(qmodel).rows)
    assert dom.count('class="node"') == len(record.nodes)
    assert dom.count('data-precision="int8"') >= 10 and dom.count('<svg class="hist"') == 6


def test_report_cli_writes_html_with_and_without_the_model(tmp_path, capsys):
    saved = tmp_path / "m.quanta.safetensors"
    assert main(["quantize", "quanta.zoo.mnist:cli_factory", "--batches", "1", "--out", str(saved)]) == 0
    plain = tmp_path / "plain.html"
    assert main(["report", str(saved), "--html", str(plain)]) == 0
    text = plain.read_text()
    assert text.count('class=layer-row') == len(quanta.report(quanta.load(saved, _mnist())).rows)
    assert "site-row" not in text and "pass --model" in text
    full = tmp_path / "full.html"
    assert main(["report", str(saved), "--html", str(full), "--model", "quanta.zoo.mnist:cli_factory",
                 "--batches", "1"]) == 0
    assert full.read_text().count("class=site-row") == 10
    assert main(["compare", str(saved), "--model", "quanta.zoo.mnist:cli_factory", "--batches", "1",
                 "--top", "3", "--json"]) == 0
    out = capsys.readouterr().out
    data = __import__("json").loads(out[out.index("{"):])
    assert len(data["sites"]) == 3 and data["output_sqnr"] > 30
    assert main(["report", str(saved), "--data", "x.pt"]) == 2


def _mnist():
    from quanta.zoo.mnist import load_pretrained_mnist_cnn

    return load_pretrained_mnist_cnn()
