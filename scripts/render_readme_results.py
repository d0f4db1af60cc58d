#!/usr/bin/env python3
"""Render bench.md and the plots from bench.json and put the results section into README.md.

Replaces what lies between the markers `<!-- bench-results -->` and `<!-- /bench-results -->`
(the markers stay); every number comes from bench.json, none is typed by hand.

    python scripts/render_readme_results.py [--bench results/bench] [--readme README.md] [--check]

--check: exit 1 if README.md or bench.md is not what bench.json renders to (for CI).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from specdeploy.bench.plots import make_plots
from specdeploy.bench.report import render_markdown, render_readme_block

START, END = "<!-- bench-results -->", "<!-- /bench-results -->"


def replace_block(readme: str, block: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no {START} ... {END} block: add the two markers where the results go")
    return pattern.sub(lambda _: f"{START}\n{block}{END}", readme, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default="results/bench", help="folder with bench.json (bench.md is written there)")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--check", action="store_true", help="only check that both files are up to date")
    args = ap.parse_args(argv)
    folder, readme_path = Path(args.bench), Path(args.readme)
    result = json.loads((folder / "bench.json").read_text())
    rel = os.path.relpath(folder, readme_path.resolve().parent if readme_path.is_absolute() else readme_path.parent or ".")
    md = render_markdown(result)
    readme = readme_path.read_text()
    if START not in readme and not args.check:
        (folder / "bench.md").write_text(md)
        print(f"wrote {folder / 'bench.md'}; {readme_path} has no {START} ... {END} block: add the two markers "
              "where the results go, then run this again", file=sys.stderr)
        return 1
    new_readme = replace_block(readme, render_readme_block(result, rel.replace(os.sep, "/")))
    if args.check:
        stale = [p for p, old, new in ((folder / "bench.md", (folder / "bench.md").read_text() if (folder / "bench.md").exists() else "", md),
                                       (readme_path, readme, new_readme)) if old != new]
        for p in stale:
            print(f"{p} is out of date: run scripts/render_readme_results.py", file=sys.stderr)
        return 1 if stale else 0
    (folder / "bench.md").write_text(md)
    readme_path.write_text(new_readme)
    plots = make_plots(result, folder)
    print(f"wrote {folder / 'bench.md'}, {len(plots)} plots and the results block of {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
