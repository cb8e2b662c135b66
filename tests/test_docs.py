"""The README tells the truth: every config key and every packing flag is documented."""

import dataclasses

from conftest import REPO

from pathgan.cli import build_parser
from pathgan.config import Config

README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_reference():
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.type):
            assert f"`{section.name}.{field.name}`" in README, f"{section.name}.{field.name}"


def _subparser(parser, *names):
    for name in names:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def test_every_option_of_the_main_commands_is_documented():
    parser = build_parser()
    for path in (("shards", "pack"), ("sample",), ("embed",), ("eval",)):
        for action in _subparser(parser, *path)._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in README, f"pathgan {' '.join(path)} {flag}"


def test_readme_starts_with_the_two_commands():
    head = README[:800]
    assert "make demo" in head and "make test" in head
