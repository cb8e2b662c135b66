"""The docs tell the truth: every config key and every packing flag is documented, what the
comments of launch/ and slurm/ name (commands, encoder specs, configs, environment variables)
exists and parses, and every command of the README's, launch/'s and slurm/'s examples runs as
written as far as it can without data: through pathgan's own parser, its configs resolved, and
`accelerate launch` lines through accelerate's parser with their config files loaded by
accelerate's own loader."""

import contextlib
import dataclasses
import io
import re
import typing
from pathlib import Path

from conftest import REPO

from pathgan.cli import build_parser, parse_args
from pathgan.config import Config, load_config
from pathgan.core.errors import PathganError
from pathgan.encoders import is_encoder_id, parse_spec

README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_reference():
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.type):
            assert f"`{section.name}.{field.name}`" in README, f"{section.name}.{field.name}"


def _reference_row(key: str) -> list[str]:
    """The cells of a key's row in the README's configuration reference."""
    row = next(line for line in README.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_every_declared_choice_and_its_default_are_in_the_reference():
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.type)
        for field in dataclasses.fields(section.type):
            if typing.get_origin(hints[field.name]) is not typing.Literal:
                continue
            key = f"{section.name}.{field.name}"
            _, default, meaning = _reference_row(key)
            assert default == f"`{field.default}`", key
            for choice in typing.get_args(hints[field.name]):
                assert f"`{choice}`" in default + meaning, f"{key}: {choice}"


def _subparser(parser, *names):
    for name in names:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def test_every_option_of_the_main_commands_is_documented():
    parser = build_parser()
    for path in (("shards", "pack"), ("sample",), ("embed",), ("eval",), ("push",)):
        for action in _subparser(parser, *path)._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in README, f"pathgan {' '.join(path)} {flag}"


def test_the_packing_section_gives_the_demos_options():
    from pathgan.demo import PACK_OPTIONS

    section = _readme_section("Packing shards")
    options = [str(o.relative_to(REPO)) if isinstance(o, Path) else o for o in PACK_OPTIONS]
    command = "pathgan shards pack shards/cmu_small_region.svs --out shards/sample " + \
        " ".join(options)
    assert command in section


def test_readme_starts_with_the_two_commands():
    head = README[:800]
    assert "make demo" in head and "make test" in head


# --- launch/ and slurm/: what their comments and READMEs say is what the scripts do -----------

OWN_README_SECTIONS = ("Multi-GPU and multi-node", "SLURM", "Troubleshooting")
VARIABLE = re.compile(r"\b(?:PATHGAN|SLURM)_[A-Z0-9_]+\b")


def _comments(path: Path) -> str:
    """What a file tells its reader: a Markdown file whole, else its comment lines (``#SBATCH``
    and ``#!`` lines are directives), one ``#`` and one space stripped."""
    text = path.read_text()
    if path.suffix == ".md":
        return text
    return "\n".join(re.sub(r"^\s*# ?", "", line) for line in text.splitlines()
                     if re.match(r"\s*#(?!SBATCH|!)", line))


def _readme_section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


SCRIPT_DOCS = {
    **{str(path.relative_to(REPO)): _comments(path)
       for path in sorted([*REPO.glob("launch/*"), *REPO.glob("slurm/*")]) if path.is_file()},
    **{f"README.md ({title})": _readme_section(title) for title in OWN_README_SECTIONS},
}


def _snippets(text: str) -> list[str]:
    """The command lines a text shows: `spans`, fenced code and indented example lines, with
    backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    fenced = [line for block in re.findall(r"```\w*\n(.*?)```", text, re.S)
              for line in block.splitlines()]
    indented = [line for line in text.splitlines() if line.startswith("  ")]
    return [*re.findall(r"`([^`\n]+)`", text), *fenced, *indented]


def _words(command: str) -> list[str]:
    """A command's words up to a comment, a quote or the end of its shell statement, without
    the optional ``[...]`` parts and ``...`` of a usage line."""
    command = re.split(r"\s#|[\"'`);|&]", command)[0]
    command = re.sub(r"\[[^\]]*\]", " ", command)
    return [word for word in command.split() if word != "..."]


def _is_placeholder(word: str) -> bool:
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", word) is not None


def _commands(pattern: str) -> list[tuple[str, list[str]]]:
    """(document, words after the match) for every command line matching ``pattern``."""
    found = []
    for name, text in SCRIPT_DOCS.items():
        for snippet in _snippets(text):
            for match in re.finditer(pattern, snippet):
                found.append((name, _words(snippet[match.end():])))
    return found


def _parse(words: list[str]) -> tuple[object, str]:
    """``pathgan WORDS`` through the real parser: (namespace or None, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            return parse_args(words), ""
        except SystemExit as stop:  # --help exits 0
            return None, "" if stop.code == 0 else printed.getvalue().strip()


def _names_a_command(words: list[str]) -> bool:
    """Only (sub)command names, e.g. `pathgan shards pack` in a sentence."""
    parser = build_parser()
    for word in words:
        choices = _subcommands(parser)
        if word not in choices:
            return False
        parser = choices[word]
    return True


def _subcommands(parser) -> dict:
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return actions[0].choices if actions else {}


def test_every_pathgan_command_in_launch_and_slurm_docs_parses():
    commands = _commands(r"(?:^|[\s\"'(=])(?:[\w./-]*/)?pathgan\s+")
    top_level = _subcommands(build_parser())
    commands = [(name, words) for name, words in commands if words and words[0] in top_level]
    assert len(commands) >= 5, commands
    for name, words in commands:
        if _names_a_command(words):
            continue
        args, error = _parse(words)
        assert not error, f"{name}: `pathgan {' '.join(words)}`: {error}"
        encoder = getattr(args, "encoder", None)
        if encoder and not _is_placeholder(encoder) and not is_encoder_id(encoder):
            parse_spec(encoder)


def test_every_encoder_spec_given_to_embed_sbatch_is_valid():
    examples = [(name, words) for name, words in _commands(r"slurm/embed\.sbatch\s+")
                if len(words) >= 2 and not _is_placeholder(words[1])]
    assert examples
    for name, (_, spec, *_) in examples:
        try:
            parse_spec(spec)
        except PathganError as error:
            raise AssertionError(f"{name}: slurm/embed.sbatch ... {spec}: {error}") from None


def test_every_training_command_names_a_config_and_valid_overrides():
    examples = []
    for name, words in _commands(r"(?:launch/train\.sh|slurm/train\.sbatch)\s+"):
        if words and words[0].endswith((".yaml", ".yml")):  # not CONFIG, nor a sentence
            if "--resume" in words:
                del words[words.index("--resume"):words.index("--resume") + 2]
            examples.append((name, words))
    assert len(examples) >= 5, examples
    for name, (config, *overrides) in examples:
        try:
            load_config(REPO / config, overrides)
        except PathganError as error:
            raise AssertionError(f"{name}: {config} {' '.join(overrides)}: {error}") from None


def _variables_read() -> set[str]:
    """PATHGAN_*/SLURM_* variables the scripts (``$NAME``) and pathgan (``"NAME"``) read."""
    read = set()
    for path in [*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sbatch")]:
        code = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        read.update(re.findall(r"\$\{?((?:PATHGAN|SLURM)_[A-Z0-9_]+)", code))
    for path in [*REPO.glob("pathgan/**/*.py"), *REPO.glob("slurm/*.py")]:
        read.update(re.findall(r"[\"']((?:PATHGAN|SLURM)_[A-Z0-9_]+)[\"']", path.read_text()))
    return read


def test_every_variable_the_docs_name_is_read_by_the_scripts():
    read = _variables_read()
    assert {"PATHGAN_PROCS_PER_NODE", "SLURM_STEP_NUM_NODES", "SLURM_ARRAY_TASK_ID"} <= read
    unread = {f"{name}: {variable}" for name, text in SCRIPT_DOCS.items()
              for variable in VARIABLE.findall(text) if variable not in read}
    assert not unread, sorted(unread)


def test_the_gpu_request_of_train_sbatch_says_how_to_override_it():
    assert "#SBATCH --gres=gpu:8" in (REPO / "slurm" / "train.sbatch").read_text()
    for name in ("slurm/train.sbatch", "slurm/README.md", "README.md (SLURM)"):
        text = SCRIPT_DOCS[name]
        assert "--gres=none" in text and re.search(r"--gres=gpu:[0-9N]\b", text), name


# --- the README's examples run as written ------------------------------------------------------

EXAMPLE_DOCS = {name: (REPO / name).read_text()
                for name in ("README.md", "launch/README.md", "slurm/README.md")}


def _example_lines() -> list[tuple[str, str]]:
    """(document, line) for every line of a ```bash block, continuations joined."""
    lines = []
    for name, text in EXAMPLE_DOCS.items():
        text = re.sub(r"\\\n\s*", " ", text)
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            lines.extend((name, line) for line in block.splitlines() if line.strip())
    return lines


def _example_commands(pattern: str) -> list[tuple[str, list[str]]]:
    return [(name, _words(line[match.end():])) for name, line in _example_lines()
            for match in re.finditer(pattern, line)]


PATHGAN = r"(?:^|[\s\"'(=])(?:[\w./-]*/)?pathgan\s+"


def test_every_pathgan_example_parses():
    commands = [(name, words) for name, words in _example_commands(PATHGAN)
                if words and words[0] in _subcommands(build_parser())]
    assert len(commands) >= 30, commands
    for name, words in commands:
        _, error = _parse(words)
        assert not error, f"{name}: `pathgan {' '.join(words)}`: {error}"


def _resolves(name: str, words: list[str]) -> None:
    """A training command's config, as pathgan train would resolve it (a resume needs its run
    folder: it must name one)."""
    args, _ = _parse(words)
    if args.resume is not None:
        assert args.config or any(o.startswith("run.dir=") for o in args.overrides), \
            f"{name}: `pathgan {' '.join(words)}` names no run folder to resume"
    if args.config and not _is_placeholder(args.config) and "{" not in args.config:
        try:
            load_config(REPO / args.config, args.overrides)
        except PathganError as error:
            raise AssertionError(f"{name}: `pathgan {' '.join(words)}`: {error}") from None


def test_every_training_example_resolves_its_config():
    commands = [(name, words) for name, words in _example_commands(PATHGAN)
                if words and words[0] == "train"]
    assert len(commands) >= 8, commands
    for name, words in commands:
        _resolves(name, words)


def test_every_accelerate_launch_example_runs_as_written():
    """Parsed by accelerate's own parser; its config file loaded by accelerate's own loader,
    and a file that leaves the process count open (-1) comes with --num_processes, or
    accelerate would stop to ask; the pathgan command it launches parses and resolves."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    commands = _example_commands(r"accelerate launch\s+")
    assert len(commands) >= 4, commands
    for name, words in commands:
        args = launch_command_parser().parse_args(words)
        shown = f"{name}: `accelerate launch {' '.join(words)}`"
        if args.config_file:
            loaded = load_config_from_file(str(REPO / args.config_file))
            if loaded.num_processes in (None, -1):
                assert args.num_processes, f"{shown}: {args.config_file} leaves num_processes " \
                                           "to be asked: pass --num_processes N"
        assert args.module and args.training_script == "pathgan", shown
        pathgan = args.training_script_args
        _, error = _parse(pathgan)
        assert not error, f"{shown}: {error}"
        if pathgan[0] == "train":
            _resolves(name, pathgan)


def test_every_launch_config_loads_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted(REPO.glob("launch/*.yaml"))
    assert len(files) >= 4
    for path in files:
        loaded = load_config_from_file(str(path))
        assert loaded.compute_environment.value == "LOCAL_MACHINE", path.name
