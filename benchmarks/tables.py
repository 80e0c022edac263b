"""Rewrite the tables of benchmarks/README.md from the results files, so no figure is copied by hand.

    python benchmarks/tables.py            # rewrite every table in benchmarks/README.md
    python benchmarks/tables.py --check    # exit 1 if a table differs from its results file

A table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``, where NAME is the results
file's path under ``benchmarks/results/`` without ``.json`` (``segmentation``, ``ema/textseg``,
``ema/decay-0.9995/segmentation``...). The file's stem says which function renders it (``KINDS``):
the benchmark scripts' own table functions where they exist, so ``results/*.md`` and the README
agree. A new kind of results file (``streaming``, ``sr``, ``ssl``...) adds one entry to ``KINDS``;
until it has one, ``flat_table`` renders a mapping of runs to figures. Every results file needs a
table in the README and every table a results file: ``--check`` fails otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKER = re.compile(r"(<!-- table:(?P<name>[\w./@:-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package); only its table code runs."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def segmentation_table(path: Path) -> str:
    script = _script("segmentation")
    return script.table(script._read_results(path)) + "\n"


def textseg_table(path: Path) -> str:
    return _script("textseg").table(json.loads(path.read_text()))


def fewshot_table(path: Path) -> str:
    return _script("fewshot").markdown(json.loads(path.read_text()))


def sr_table(path: Path) -> str:
    return _script("sr").table(json.loads(path.read_text()))


def streaming_table(path: Path) -> str:
    return _script("streaming").table(json.loads(path.read_text()))


def _cell(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def flat_table(path: Path) -> str:
    """Fallback for a kind without its own function: ``{run: {figure: value}}`` (or a list of
    such rows), one row per run, one column per figure that is a number or a string."""
    results = json.loads(path.read_text())
    rows = (
        results
        if isinstance(results, list)
        else [{"run": k, **v} for k, v in results.items() if isinstance(v, dict)]
    )
    columns = list(
        dict.fromkeys(k for row in rows for k, v in row.items() if isinstance(v, str | int | float))
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "-")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ssl_table(path: Path) -> str:
    return _script("pretrain").table(json.loads(path.read_text()))  # pretrain.py writes results/ssl.json


KINDS: dict[str, Callable[[Path], str]] = {
    "segmentation": segmentation_table,
    "textseg": textseg_table,
    "fewshot": fewshot_table,
    "sr": sr_table,
    "ssl": ssl_table,
    "streaming": streaming_table,
}


def results_files(results: Path) -> dict[str, Path]:
    """NAME -> results file; smoke runs (``*-quick.json``) are not benchmark results."""
    files = sorted(p for p in results.rglob("*.json") if not p.stem.endswith("-quick"))
    return {p.relative_to(results).with_suffix("").as_posix(): p for p in files}


def render(path: Path) -> str:
    return KINDS.get(path.stem, flat_table)(path)


def rewrite(readme: Path, results: Path) -> tuple[str, list[str]]:
    """The README with every table regenerated, and the problems found (tables without a results
    file, results files without a table)."""
    files = results_files(results)
    text = readme.read_text()
    named = {m["name"] for m in MARKER.finditer(text)}
    problems = [f"table:{n} has no results file {n}.json" for n in sorted(named - files.keys())]
    problems += [f"results/{n}.json has no table:{n} in {readme.name}" for n in sorted(files.keys() - named)]

    def fill(match: re.Match) -> str:
        name = match["name"]
        body = render(files[name]) if name in files else match["body"]
        return match[1] + body + match[4]

    return MARKER.sub(fill, text), problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a table is out of date"
    )
    args = parser.parse_args(argv)
    text, problems = rewrite(args.readme, args.results)
    for problem in problems:
        print(f"tables: {problem}", file=sys.stderr)
    if args.check:
        stale = text != args.readme.read_text()
        if stale:
            print(f"tables: {args.readme} is out of date; run python benchmarks/tables.py", file=sys.stderr)
        return 1 if stale or problems else 0
    args.readme.write_text(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
