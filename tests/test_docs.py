"""The docs are executable truth: what they show, the code takes.

Every YAML config block of README.md, docs/*.md and infra/README.md says which job it configures with a
marker on the line before it, `<!-- config: jobs.curate -->` (or `jobs.synthesize`, `jobs.encode`,
`jobs.train`, `jobs.merge`, or `serve` for a Serve deployment file), and validates with that job's
config class as the job itself loads it. A block that looks like a config and has no marker fails,
so a new example cannot go in unchecked. Every `python -m MODULE ... --flag` in the docs names a
module that runs and flags that its `--help` lists.
"""

import contextlib
import io
import re
import runpy
import sys
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from jobs.curate import CurateConfig
from jobs.encode import EncodeConfig
from jobs.merge import MergeJobConfig
from jobs.synthesize import SynthesizeConfig
from jobs.train_config import TrainConfig
from omniflow import storage as st
from omniflow.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "infra" / "README.md")
JOB_CONFIGS = {
    "jobs.curate": CurateConfig,
    "jobs.synthesize": SynthesizeConfig,
    "jobs.encode": EncodeConfig,
    "jobs.train": TrainConfig,
    "jobs.merge": MergeJobConfig,
}
SERVE = "serve"
FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*config:\s*(\S+)\s*-->\s*\Z")
CONFIG_LANGUAGES = {"yaml", "yml"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", ""}
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    language: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the config marker just before it, if any."""
    text = path.read_text()
    doc = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    out = []
    for m in FENCE.finditer(text):
        before = MARKER.search(text[: m.start()])
        out.append(Block(doc=doc, line=text.count("\n", 0, m.start()) + 1, language=m.group(1).lower(),
                         text=m.group(2), marker=before.group(1) if before else None))
    return out


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def looks_like_config(block: Block) -> bool:
    """A YAML block, or an untagged block whose text is a YAML mapping (a config without its tag)."""
    if block.language in CONFIG_LANGUAGES:
        return True
    if block.language:
        return False
    try:
        return isinstance(yaml.safe_load(block.text), dict)
    except yaml.YAMLError:
        return False


def config_blocks() -> list[Block]:
    return [b for b in all_blocks() if looks_like_config(b)]


# ---- config blocks ------------------------------------------------------------------------------


@pytest.fixture
def no_storage(monkeypatch):
    """The examples name buckets that do not exist here: validating one must not open storage."""

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"validating a documented config opened {path}")

    monkeypatch.setattr(st, "filesystem", refuse)


def validate_serve(data: dict, where: str) -> None:
    """A `serve run` / `serve deploy` file: Ray Serve's own schema, then each application's
    `args` with the application's config class."""
    from ray.serve.schema import ServeDeploySchema

    from serve.schema import ServeConfig

    ServeDeploySchema.model_validate(data)
    for app in data["applications"]:
        assert "args" in app, f"{where}: application {app.get('name')} has no args"
        ServeConfig.model_validate(app["args"])


def test_docs_have_config_blocks():
    """The examples this test exists for are there (a broken block scanner would pass vacuously)."""
    markers = [b.marker for b in config_blocks()]
    assert {"jobs.curate", "jobs.synthesize", "jobs.encode", "jobs.merge"} <= set(markers), markers


def test_every_config_block_names_its_job():
    known = {*JOB_CONFIGS, SERVE}
    for block in all_blocks():
        if looks_like_config(block):
            assert block.marker is not None, (
                f"{block.where}: a config block without a marker; put `<!-- config: JOB -->` on the line "
                f"before it, JOB one of {sorted(known)}"
            )
            assert block.marker in known, f"{block.where}: marker {block.marker!r} is not one of {sorted(known)}"
        else:
            assert block.marker is None, f"{block.where}: a config marker before a {block.language or 'plain'} block"


@pytest.mark.parametrize("block", config_blocks(), ids=lambda b: f"{b.where}-{b.marker}")
def test_config_block_validates(block, no_storage):
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.where}: not a YAML mapping"
    if block.marker == SERVE:
        validate_serve(data, block.where)
        return
    assert block.marker in JOB_CONFIGS, f"{block.where}: marker {block.marker!r} names no job"
    assert "applications" not in data, f"{block.where}: a Serve config marked {block.marker}"
    # load_config is the jobs' own path from YAML to config, with errors that name the field
    load_config(JOB_CONFIGS[block.marker], data)


def test_a_marker_catches_a_wrong_block(tmp_path, no_storage):
    """The check fails where it should: a curation config with the shape the README once showed
    (scorer settings at the top of `clip`) does not validate, and an unmarked config is found."""
    from omniflow.config import ConfigError

    doc = tmp_path / "README.md"
    doc.write_text(
        "<!-- config: jobs.curate -->\n```yaml\noutput: out\nsources: [{name: a, type: shapesworld}]\n"
        "clip: {model_name: ViT-L-14, batch_size: 256}\n```\n\n```yaml\noutput: out\n```\n"
    )
    found = blocks(doc)
    assert [b.marker for b in found] == ["jobs.curate", None]
    assert all(looks_like_config(b) for b in found)
    with pytest.raises(ConfigError, match=r"clip\.model_name: Extra inputs are not permitted"):
        load_config(CurateConfig, yaml.safe_load(found[0].text))


# ---- python -m commands -------------------------------------------------------------------------

# A module path with an upper-case part is a placeholder: `jobs.NAME` stands for every job.
PLACEHOLDERS = {"jobs.NAME": sorted(JOB_CONFIGS)}


@dataclass(frozen=True)
class Command:
    where: str
    module: str
    words: tuple[str, ...]  # what follows the module: positionals, flags, key=value

    @property
    def flags(self) -> list[str]:
        return [m.group(1) for w in self.words for m in FLAG.finditer(w)]

    @property
    def first_positional(self) -> str | None:
        """The first word after the module, if it could be a subcommand."""
        if self.words and re.fullmatch(r"[a-z][\w-]*", self.words[0]):
            return self.words[0]
        return None


def _segment_commands(segment: str, where: str) -> list[Command]:
    out = []
    for m in re.finditer(r"\bpython3? -m ([A-Za-z_][\w.]*)", segment):
        rest = segment[m.end():]
        out.append(Command(where=where, module=m.group(1), words=tuple(rest.split())))
    return out


def shell_lines(block: Block) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and what follows a pipe,
    `&&` or `;` cut off (a later command is its own)."""
    joined = block.text.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        lines.extend(part for part in re.split(r"\s(?:\||&&|;)\s", line) if part.strip())
    return lines


def doc_commands() -> list[Command]:
    """Every `python -m` of the docs: in shell blocks, line by line, and in inline code spans."""
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        name = str(doc.relative_to(ROOT))
        for block in blocks(doc):
            if block.language in SHELL_LANGUAGES:
                for line in shell_lines(block):
                    commands += _segment_commands(line, block.where)
        prose = FENCE.sub("", text)
        for span in re.findall(r"`([^`]+)`", prose):
            commands += _segment_commands(" ".join(span.split()), f"{name}: `{span.strip()[:60]}`")
    return commands


@cache
def help_text(module: str, subcommand: str | None = None) -> str:
    """`python -m MODULE [SUBCOMMAND] --help`, run once per module (and subcommand) in this
    interpreter: the module runs as `__main__`, as `python -m` runs it, without paying another
    interpreter's imports of torch and Ray each time."""
    argv = [module, *([subcommand] if subcommand else []), "--help"]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.argv
    try:
        sys.argv = argv
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            with pytest.raises(SystemExit) as exit_:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    assert exit_.value.code in (0, None), f"{' '.join(argv)} exits {exit_.value.code}: {stderr.getvalue()[-2000:]}"
    return stdout.getvalue()


def subcommands(help_: str) -> set[str]:
    """argparse's `{a,b,c}` choices of subcommands in a usage text."""
    return {name for group in re.findall(r"\{([\w,-]+)\}", help_) for name in group.split(",")}


def test_docs_have_python_m_commands():
    modules = {c.module for c in doc_commands()}
    assert {"jobs.curate", "jobs.train", "shapesworld.toy", "serve"} <= modules, sorted(modules)


def test_python_m_commands_name_real_modules_and_flags():
    commands = doc_commands()
    problems = []
    for command in commands:
        for module in PLACEHOLDERS.get(command.module, [command.module]):
            assert not any(part.isupper() for part in module.split(".")), (
                f"{command.where}: placeholder module {module}; list what it stands for in PLACEHOLDERS")
            help_ = help_text(module)
            sub = command.first_positional
            if sub is not None and sub in subcommands(help_):
                help_ = help_text(module, sub)
            for flag in command.flags:
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_):
                    problems.append(f"{command.where}: python -m {module}{' ' + sub if sub else ''} has no {flag}")
    assert not problems, "\n".join(problems)


def test_flag_check_catches_a_wrong_flag():
    """The check is not vacuous: a flag a module lacks is not in its help, a real one is."""
    (command,) = _segment_commands("python -m jobs.curate --config c.yaml --no-such-flag", "here")
    help_ = help_text("jobs.curate")
    assert command.flags == ["--config", "--no-such-flag"]
    assert re.search(r"(?<![\w-])--config(?![\w-])", help_)
    assert not re.search(r"(?<![\w-])--no-such-flag(?![\w-])", help_)
