"""quanta quantize --max-drop --eval --order."""

from pathlib import Path

import quanta
from quanta.cli import main

FACTORY = f"{Path(__file__).parent / 'target_factory.py'}:make"


def test_max_drop_prints_what_it_kept_float(tmp_path, capsys):
    out = tmp_path / "m.quanta.safetensors"
    # -0.5: closer than float itself is impossible; the command still saves the best model
    assert main(["quantize", FACTORY, "--max-drop", "-0.5", "--order", "sqnr", "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "target NOT met" in text.out and "kept float by the accuracy target" in text.out
    assert out.is_file()
    rows = quanta.report(quanta.load(out, __import__("target_factory").make()["model"])).rows
    assert [r["precision"] for r in rows if r["op"] == "Linear"] == ["float"] * 3


def test_max_drop_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "m.quanta.safetensors")
    assert main(["quantize", "quanta.zoo.mnist:cli_factory", "--max-drop", "1", "--out", out]) == 2
    assert "--max-drop needs a metric" in capsys.readouterr().err
    assert main(["quantize", FACTORY, "--eval", f"{FACTORY[:-5]}:bad_eval", "--out", out]) == 2
    assert "pass --max-drop too" in capsys.readouterr().err
    assert main(["quantize", FACTORY, "--max-drop", "0.1", "--eval", f"{FACTORY[:-5]}:bad_eval",
                 "--out", out]) == 1
    assert "expected a number" in capsys.readouterr().err
