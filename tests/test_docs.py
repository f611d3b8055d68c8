"""Every command, path and link the docs show works from a fresh clone; checked without running anything heavy.

Commands come from the markdown's code blocks (fenced or indented) and from inline code that starts with a
command this repository answers for: `python -m mlproject ...`, its console scripts (`lr-finder`,
`lr-finder-job`), `python -m benchmarks.X ...` and `mlflow run . -e ENTRY -P key=value`.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "RESULTS.md"]
SHELL_FENCES = ("", "sh", "bash", "shell", "console")
CONTROL = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>>"}


# --- reading markdown -------------------------------------------------------------------------------------------


def code_blocks(markdown: str) -> list[str]:
    """The shell code blocks: ``` fences with a shell language (or none), and blocks indented by 4 spaces."""
    blocks, current, fence, previous = [], [], None, ""
    for line in markdown.splitlines():
        if fence is not None:
            if line.strip().startswith("```"):
                blocks += ["\n".join(current)] if fence in SHELL_FENCES else []
                current, fence = [], None
            else:
                current.append(line)
        elif line.strip().startswith("```"):
            fence = line.strip()[3:].strip().lower()
        elif line.startswith("    ") and (current or not previous.strip()):
            current.append(line[4:])
        elif current and not line.strip():
            current.append("")
        elif current:
            blocks.append("\n".join(current))
            current = []
        previous = line
    return blocks + (["\n".join(current)] if current and fence is None else [])


def prose(markdown: str) -> str:
    """The markdown without its code blocks (a link inside one is no link)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.sub(r"(?:^\n)(?:^(?: {4}.*)?\n)+", "\n", text, flags=re.M)


def inline_code(markdown: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose(markdown))


def command_lines(block: str) -> list[str]:
    """One string per shell line, with backslash continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at && || ; | &, without comments, redirections and leading
    VAR=value assignments; [] when the line is not shell (unbalanced quotes in a prose-like block). A placeholder
    such as <id> stands for a value, not for redirections."""
    lexer = shlex.shlex(re.sub(r"<([^<>\s]+)>", r"\1", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return []
    simple, current = [], []
    for word in [*words, ";"]:
        if word in CONTROL:
            simple.append(current)
            current = []
        else:
            current.append(word)
    return [strip_shell_noise(command) for command in simple if command]


def strip_shell_noise(words: list[str]) -> list[str]:
    """The command's own words: redirections and leading assignments (VAR=value, sudo, a $ prompt) left out."""
    kept: list[str] = []
    skip_next = False
    for word in words:
        if skip_next or word in REDIRECTS:
            skip_next = word in REDIRECTS
            continue
        kept.append(word)
    while kept and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kept[0]) or kept[0] in ("sudo", "$")):
        kept.pop(0)
    return kept


def doc_commands(markdown: str) -> list[list[str]]:
    """Every command in the code blocks, and every inline code span that starts with a command checked here."""
    found = [words for block in code_blocks(markdown) for line in command_lines(block) for words in commands(line)]
    for span in inline_code(markdown):
        found += [words for words in commands(span) if program(words) is not None]
    return found


# --- the repository as a fresh clone has it ---------------------------------------------------------------------


@functools.cache
def repository_files() -> frozenset[str]:
    """Tracked files and untracked ones git does not ignore: what a clone holds once this change is committed."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    if listing.returncode != 0:  # not a git checkout (an unpacked archive): take the folder as it is
        return frozenset(str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts)
    return frozenset(name for name in listing.stdout.splitlines() if (REPO / name).exists())


def top_level_folders() -> set[str]:
    return {name.split("/", 1)[0] for name in repository_files() if "/" in name}


def path_exists(path: str) -> bool:
    """A file of the repository, a folder holding one, or a glob matching one."""
    path = path.rstrip("/")
    files = repository_files()
    if any(ch in path for ch in "*?["):
        return any(fnmatch.fnmatch(name, path) for name in files)
    return path in files or any(name.startswith(path + "/") for name in files)


@functools.cache
def entry_points() -> dict[str, set[str]]:
    """MLproject's entry points -> their parameter names."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    return {name: set(entry.get("parameters", {})) for name, entry in spec["entry_points"].items()}


@functools.cache
def console_scripts() -> dict[str, str]:
    """pyproject's console scripts -> the module that defines them."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def module_file(module: str) -> Path | None:
    """The file `python -m module` runs, if the repository has it."""
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def argparse_options(path: Path) -> set[str]:
    """The options a script's argparse parser declares, read from its source without importing it."""
    options = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return options


def click_group(module: str) -> click.Command:
    """The click command a module's command line is built on: its `cli`."""
    return importlib.import_module(module).cli


# --- checking one command ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """What a documented command runs: a click or an argparse command line of `module`, `mlflow run`, or a module
    the repository lacks ("missing"); `args` are the words after it."""

    kind: str
    module: str
    args: list[str]


def program(words: list[str]) -> Program | None:
    """The program of a command, or None for a command this repository does not answer for (bash, pip, git...)."""
    if not words:
        return None
    name = Path(words[0]).name if Path(words[0]).parent.name in ("", "bin") else ""  # lr-finder, .venv/bin/python
    if name.startswith("python") and words[1:2] == ["-m"] and len(words) > 2:
        return python_module(words[2], words[3:])
    if name in console_scripts():
        return Program("click", console_scripts()[name], words[1:])
    if name == "mlflow" and words[1:2] == ["run"]:
        return Program("mlflow run", "", words[2:])
    return None


def python_module(module: str, args: list[str]) -> Program | None:
    """`python -m module args`, when the module's package is one of the repository's."""
    if module.split(".")[0] not in top_level_folders():
        return None
    found = module_file(module)
    if found is None:
        return Program("missing", module, args)
    if "add_argument(" in found.read_text():
        return Program("argparse", module, args)
    return Program("click", module if found.name != "__main__.py" else module + ".__main__", args)


def option_words(words: list[str]) -> list[str]:
    """The option names among a command's words: `--name=value` -> `--name`; values and arguments left out."""
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and len(w) > 1 and not w[1].isdigit()]


def click_options(command: click.Command) -> dict[str, click.Parameter]:
    params = command.get_params(click.Context(command))
    return {name: p for p in params if isinstance(p, click.Option) for name in [*p.opts, *p.secondary_opts]}


def resolve(root: click.Command, words: list[str]) -> tuple[click.Command, list[str], list[str], list[str]]:
    """Walk a click group down its subcommands: (the command reached, its path, the words left, problems)."""
    command, path, rest, problems = root, [], list(words), []
    while isinstance(command, click.Group) and rest:
        word = rest.pop(0)
        if word.startswith("-"):  # an option of the group itself
            option = click_options(command).get(word.split("=", 1)[0])
            if option is None:
                problems.append(f"`{' '.join(path) or 'the group'}` has no option {word}")
            elif not option.is_flag and not option.count and "=" not in word and rest:
                rest.pop(0)
            continue
        if word not in command.commands:
            return command, path, [], [*problems, f"no command `{' '.join([*path, word])}`"]
        command, path = command.commands[word], [*path, word]
    return command, path, rest, problems


def click_problems(module: str, words: list[str]) -> list[str]:
    command, path, rest, problems = resolve(click_group(module), words)
    accepted = click_options(command)
    problems += [f"`{' '.join(path)}` has no option {o}" for o in option_words(rest) if o not in accepted]
    if "-P" in rest and path == ["run"]:  # `lr-finder run` passes -P to the project's MLproject
        problems += mlproject_problems(rest)
    return problems


def value_after(words: list[str], *flags: str) -> str | None:
    for i, word in enumerate(words[:-1]):
        if word in flags:
            return words[i + 1]
    return None


def mlproject_problems(words: list[str]) -> list[str]:
    """`-e ENTRY` names an entry point of MLproject, and each `-P key=value` one of its parameters."""
    entry = value_after(words, "-e", "--entry-point") or "main"
    if entry not in entry_points():
        return [f"MLproject has no entry point {entry}"]
    keys = [words[i + 1].split("=", 1)[0] for i, w in enumerate(words[:-1]) if w == "-P"]
    return [f"entry point {entry} has no parameter {k}" for k in keys if k not in entry_points()[entry]]


def command_problems(words: list[str]) -> list[str]:
    """What is wrong with one command; [] for a command this repository does not answer for."""
    run = program(words)
    if run is None:
        return []
    if run.kind == "missing":
        problems = [f"no module {run.module}"]
    elif run.kind == "argparse":
        accepted = argparse_options(module_file(run.module))
        problems = [f"no option {o}" for o in option_words(run.args) if o not in accepted]
    elif run.kind == "click":
        problems = click_problems(run.module, run.args)
    else:  # mlflow run: only this project's
        problems = mlproject_problems(run.args[1:]) if run.args[:1] == ["."] else []
    return [f"{' '.join(words)}: {p}" for p in problems]


# --- checking a whole document ----------------------------------------------------------------------------------

PATH_LIKE = re.compile(r"(?<![\w./~:@$<{-])\.?[\w-]+(?:\.[\w-]+)*(?:/[\w.*?-]*)+")


def repository_paths(markdown: str) -> set[str]:
    """Path-like words whose first folder is one of the repository's (so an artifact path such as
    lr_find/summary.json, a URL or an image name is not taken for one)."""
    folders = top_level_folders()
    found = {m.group(0).rstrip(".,:;") for m in PATH_LIKE.finditer(markdown)}
    return {path for path in found if path.split("/", 1)[0] in folders}


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(markdown), flags=re.M)}


def link_problems(markdown: str, folder: Path) -> list[str]:
    """Each relative link names a file of the repository and, after #, a heading of it."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(markdown)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (folder / file).resolve() if file else None
        if path is not None and (not path.is_relative_to(REPO) or not path_exists(str(path.relative_to(REPO)))):
            problems.append(f"link {target}: no such file")
        elif anchor and (path is None or path.suffix == ".md"):
            text = path.read_text() if path is not None else markdown
            problems += [] if anchor in anchors(text) else [f"link {target}: no heading #{anchor}"]
    return problems


def doc_problems(markdown: str, folder: Path = REPO) -> list[str]:
    """Everything the checks find wrong in one document: its commands, repository paths and links."""
    problems = [p for words in doc_commands(markdown) for p in command_problems(words)]
    problems += [f"no such path {p}" for p in sorted(repository_paths(markdown)) if not path_exists(p)]
    return problems + link_problems(markdown, folder)


def named_click_commands(markdown: str) -> set[tuple[str, tuple[str, ...]]]:
    """(module, subcommand path) of every click command the document runs."""
    named = set()
    for words in doc_commands(markdown):
        run = program(words)
        if run is not None and run.kind == "click":
            _, path, _, _ = resolve(click_group(run.module), run.args)
            named.add((run.module, tuple(path)))
    return named


# --- the tests --------------------------------------------------------------------------------------------------


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_command_path_and_link_in_the_doc_exists(doc):
    assert doc_problems(doc.read_text(), doc.parent) == []


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_the_help_of_every_command_the_doc_runs_works(doc):
    for module, path in sorted(named_click_commands(doc.read_text())):
        command, _, _, _ = resolve(click_group(module), list(path))
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (module, path, result.output)


def test_the_readme_stays_a_page_for_users():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes: move the detail to docs/ or benchmarks/RESULTS.md"


def test_the_readme_keeps_the_two_quickstart_commands():
    lines = [line.strip() for block in code_blocks((REPO / "README.md").read_text()) for line in command_lines(block)]
    assert "bash .ci/setup && . .venv/bin/activate && mlflow run . --env-manager local -P auto_lr=true" in lines
    assert "bash .ci/run" in lines


def test_the_checks_read_the_commands_of_fenced_indented_and_inline_code():
    markdown = "Run `lr-finder report --experiment x` or `mlflow run . --run-id <id> -P resume=<id>`.\n\n"
    markdown += "    python -m mlproject train \\\n      --epochs 1\n\n"
    markdown += "```sh\nMLFLOW_TRACKING_URI=http://h:5000 mlflow run . -e compare  # a comment\n```\n"
    assert doc_commands(markdown) == [
        ["python", "-m", "mlproject", "train", "--epochs", "1"],
        ["mlflow", "run", ".", "-e", "compare"],
        ["lr-finder", "report", "--experiment", "x"],
        ["mlflow", "run", ".", "--run-id", "id", "-P", "resume=id"],
    ]


BOGUS = [
    ("    python -m mlproject train --no-such-option 1\n", "has no option --no-such-option"),
    ("    lr-finder-job lr-find --epochs 1 --lr-mni 1e-6\n", "has no option --lr-mni"),
    ("    lr-finder serve --port 5000\n", "no command `serve`"),
    ("Run `lr-finder run --gpu all`.\n", "has no option --gpu"),
    ("    lr-finder run -P no_such_param=1\n", "entry point main has no parameter no_such_param"),
    ("    mlflow run . -e nowhere\n", "no entry point nowhere"),
    ("Resume: `mlflow run . --run-id <id> -P resumee=<id>`.\n", "entry point main has no parameter resumee"),
    ("    mlflow run . -e lr_find -P epoch=2\n", "entry point lr_find has no parameter epoch"),
    ("    python -m benchmarks.nowhere\n", "no module benchmarks.nowhere"),
    ("    python -m benchmarks.step --no-such-flag 3\n", "no option --no-such-flag"),
    ("The figures are in benchmarks/NO_SUCH_RESULTS.md.\n", "no such path benchmarks/NO_SUCH_RESULTS.md"),
    ("See [the guide](docs/no-such-guide.md).\n", "link docs/no-such-guide.md: no such file"),
    ("See [the rules](docs/suggestion.md#no-such-heading).\n", "no heading #no-such-heading"),
]


@pytest.mark.parametrize(("snippet", "reported"), BOGUS, ids=[b[1] for b in BOGUS])
def test_the_checks_report_what_does_not_exist(snippet, reported):
    problems = doc_problems("\n" + snippet)
    assert any(reported in p for p in problems), problems
