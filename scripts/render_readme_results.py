#!/usr/bin/env python3
"""Render bench.md and the plots from bench.json and put the results section into README.md.

Replaces what lies between the markers `<!-- bench-results -->` and `<!-- /bench-results -->`
(the markers stay) with one block per bench folder, in the order given; every number comes from a
bench.json, none is typed by hand.

    python scripts/render_readme_results.py [--bench results/bench --bench results/bench_t07] [--readme README.md] [--check]

The default folders are the README's runs: the greedy bench and the T=0.7 one (the full grid at both
temperatures does not fit one 600 s device call at 256 new tokens). --check: exit 1 if README.md or a bench.md is not what the
bench.json files render to (for CI).
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
DEFAULT_BENCH = ("results/bench", "results/bench_t07")


def replace_block(readme: str, block: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no {START} ... {END} block: add the two markers where the results go")
    return pattern.sub(lambda _: f"{START}\n{block}{END}", readme, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", action="append", help="folder with bench.json (bench.md is written there); repeatable "
                    f"(default: {' and '.join(DEFAULT_BENCH)})")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--check", action="store_true", help="only check that both files are up to date")
    args = ap.parse_args(argv)
    folders, readme_path = [Path(b) for b in args.bench or DEFAULT_BENCH], Path(args.readme)
    base = readme_path.resolve().parent if readme_path.is_absolute() else readme_path.parent
    results = {f: json.loads((f / "bench.json").read_text()) for f in folders}
    mds = {f / "bench.md": render_markdown(r) for f, r in results.items()}
    readme = readme_path.read_text()
    if START not in readme and not args.check:
        for path, md in mds.items():
            path.write_text(md)
        print(f"wrote {', '.join(map(str, mds))}; {readme_path} has no {START} ... {END} block: add the two markers "
              "where the results go, then run this again", file=sys.stderr)
        return 1
    block = "\n".join(render_readme_block(r, os.path.relpath(f, base).replace(os.sep, "/")) for f, r in results.items())
    new_readme = replace_block(readme, block)
    if args.check:
        stale = [p for p, old, new in [(p, p.read_text() if p.exists() else "", md) for p, md in mds.items()]
                 + [(readme_path, readme, new_readme)] if old != new]
        for p in stale:
            print(f"{p} is out of date: run scripts/render_readme_results.py", file=sys.stderr)
        return 1 if stale else 0
    for path, md in mds.items():
        path.write_text(md)
    readme_path.write_text(new_readme)
    plots = [p for f, r in results.items() for p in make_plots(r, f)]
    print(f"wrote {', '.join(map(str, mds))}, {len(plots)} plots and the results block of {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
