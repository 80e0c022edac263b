"""The docs cannot drift from the code: every `medsight ...` line in README.md, docs/cli.md and
docs/methods.md names commands and options that exist, every command has its section in docs/cli.md
listing its options, and the tables of benchmarks/README.md are what benchmarks/tables.py makes from
the results files."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import typer

from medsight.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "cli.md", ROOT / "docs" / "methods.md")
CODE_BLOCK = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
LONG_OPTION = re.compile(r"--[a-z][\w-]*")
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def command_lines(markdown: str) -> list[str]:
    """The `medsight ...` invocations in the markdown's code blocks: continuation lines joined,
    comments dropped, `a && b` split; `torchrun ... -m medsight.cli.main CMD` counts as `medsight CMD`."""
    found = []
    for block in CODE_BLOCK.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            chain: list[list[str]] = [[]]
            for token in tokens:
                chain.append([]) if token in {"&&", "||", ";", "|"} else chain[-1].append(token)
            for words in chain:
                if "medsight.cli.main" in words:
                    words = ["medsight", *words[words.index("medsight.cli.main") + 1 :]]
                if words[:1] == ["medsight"]:
                    found.append(shlex.join(words))
    return found


def is_group(command) -> bool:
    # typer vendors its own click, so its groups are not click.Group instances
    return hasattr(command, "commands")


def is_option(param) -> bool:
    return param.param_type_name == "option"


def allowed_options(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if is_option(param):
            names.update(param.opts + param.secondary_opts)
        elif param.metavar:  # free arguments a command parses itself, e.g. fewshot's `--support IMG MASK`
            names.update(LONG_OPTION.findall(param.metavar))
    return names


def check_command(line: str, root) -> list[str]:
    """Problems with one documented command line: an unknown (sub)command or option."""
    words = shlex.split(line)[1:]
    command, path = root, ["medsight"]
    while is_group(command):
        if not words or words[0] not in command.commands:
            return [f"{line!r}: {' '.join(path)} has no command {words[0] if words else '(none given)'!r}"]
        path.append(words[0])
        command = command.commands[words.pop(0)]
    known = allowed_options(command)
    options = [
        w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-" and not NUMBER.fullmatch(w)
    ]
    return [f"{line!r}: {' '.join(path)} has no option {o}" for o in options if o not in known]


def leaf_commands(command, path: tuple[str, ...] = ("medsight",)):
    if is_group(command):
        for name, sub in command.commands.items():
            yield from leaf_commands(sub, (*path, name))
    else:
        yield " ".join(path), command


@pytest.fixture(scope="module")
def cli():
    return typer.main.get_command(app)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_and_option_exists(doc, cli):
    lines = command_lines(doc.read_text())
    assert lines, f"no medsight command found in {doc.name}"
    problems = [p for line in lines for p in check_command(line, cli)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_does_not_exist(cli):
    doc = "```bash\nmedsight predict scans/ -m best.pt -o masks --largest-component \\\n    --no-such-option\n```\n"
    lines = command_lines(doc)
    assert lines == ["medsight predict scans/ -m best.pt -o masks --largest-component --no-such-option"]
    assert check_command(lines[0], cli) == [f"{lines[0]!r}: medsight predict has no option --no-such-option"]
    assert check_command("medsight textseg segment x", cli)  # no such subcommand
    assert check_command("medsight fewshot -m m.pt --support a b q -o out", cli) == []
    assert command_lines("```bash\ncd x && medsight info a.nii  # a comment --json\n```") == [
        "medsight info a.nii"
    ]


def test_cli_reference_has_a_section_per_command_naming_every_option(cli):
    text = (ROOT / "docs" / "cli.md").read_text()
    problems = []
    for path, command in leaf_commands(cli):
        heading = f"### `{path}`\n"
        if heading not in text:
            problems.append(f"docs/cli.md has no section {heading.strip()}")
            continue
        section = re.split(r"\n#{2,3} ", text.split(heading, 1)[1], maxsplit=1)[0]
        for param in command.params:
            if is_option(param) and param.opts[-1] != "--help":
                long = [o for o in param.opts if o.startswith("--")]
                if not any(f"`{o}" in section for o in long):
                    problems.append(f"docs/cli.md section {path} does not describe {long[0]}")
        if f"\n{path}" not in section:
            problems.append(f"docs/cli.md section {path} has no example")
    assert not problems, "\n".join(problems)


def _tables_module():
    spec = importlib.util.spec_from_file_location("benchmark_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tables_are_generated_from_the_results(tmp_path):
    tables = _tables_module()
    readme = ROOT / "benchmarks" / "README.md"
    copy = tmp_path / "README.md"
    shutil.copy(readme, copy)
    assert tables.main(["--readme", str(copy), "--results", str(ROOT / "benchmarks" / "results")]) == 0
    assert copy.read_text() == readme.read_text(), "benchmarks/README.md is stale: run benchmarks/tables.py"
    assert "<!-- table:segmentation -->\n<!-- /table -->" not in readme.read_text()  # filled, not empty


def test_a_changed_result_changes_its_table_and_an_orphan_file_is_reported(tmp_path):
    tables = _tables_module()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "benchmarks" / "README.md", copy)
    seg = json.loads((results / "segmentation.json").read_text())
    seg["methods"]["context25d"]["mean_dice"] = 0.12345
    (results / "segmentation.json").write_text(json.dumps(seg))
    assert tables.main(["--readme", str(copy), "--results", str(results), "--check"]) == 1
    assert tables.main(["--readme", str(copy), "--results", str(results)]) == 0
    assert "| context25d | 0.1235 |" in copy.read_text()

    # a kind without its own table function (sr has one now): the generic table
    (results / "newkind.json").write_text(json.dumps({"bicubic": {"psnr": 30.5, "ssim": 0.9}}))
    text, problems = tables.rewrite(copy, results)
    assert problems == [f"results/newkind.json has no table:newkind in {copy.name}"]
    copy.write_text(text + "\n<!-- table:newkind -->\n<!-- /table -->\n")
    text, problems = tables.rewrite(copy, results)
    assert problems == []
    assert "| run | psnr | ssim |\n|---|---|---|\n| bicubic | 30.5 | 0.9 |\n" in text
