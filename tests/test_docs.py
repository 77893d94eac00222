"""The user's guide says what the code does: every flag it names exists, every flag of the
commands that load a model is in it, the environment rule holds for all of them, and the
signatures and defaults it quotes are the code's."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest
import smolcandle
from smolcandle import DEFAULTS, cli

ROOT = Path(__file__).resolve().parent.parent
USAGE = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
# Flags of other programs that the guide quotes (cargo's).
OTHER_PROGRAMS = {"--features"}
MODEL_COMMANDS = ("chat", "run", "serve")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _all_flags() -> set[str]:
    flags = {f for a in cli.build_parser()._actions for f in a.option_strings}
    for p in _subparsers().values():
        flags |= {f for a in p._actions for f in a.option_strings}
    return flags


def test_every_flag_the_guide_names_exists():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", USAGE)) - OTHER_PROGRAMS
    missing = sorted(named - _all_flags())
    assert not missing, f"docs/usage.md names flags the command line does not have: {missing}"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_flag_of_a_model_command_is_in_the_guide(command):
    absent = sorted(a.option_strings[0] for a in _options(_subparsers()[command]) if not any(f in USAGE for f in a.option_strings))
    assert not absent, f"`smolcandle {command}` has flags docs/usage.md does not mention: {absent}"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_option_names_its_environment_variable_by_one_rule(command, monkeypatch):
    for action in _options(_subparsers()[command]):
        name = cli.env_name(action.option_strings[0])
        assert f"[env {name}]" in (action.help or ""), f"{action.option_strings[0]}: its help does not name {name}"
    # and the variable is the option's default
    monkeypatch.setenv("SMOLCANDLE_TOP_P", "0.5")
    monkeypatch.setenv("SMOLCANDLE_NO_SPECULATIVE", "1")
    args = cli.build_parser().parse_args(["serve"])
    assert args.top_p == 0.5 and args.no_speculative is True


def test_a_bad_value_in_the_environment_is_reported_as_a_bad_flag(monkeypatch, capsys):
    monkeypatch.setenv("SMOLCANDLE_PORT", "eighty")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve"])
    assert "--port: invalid int value: 'eighty'" in capsys.readouterr().err


def test_the_guide_names_only_environment_variables_that_exist():
    commands = _subparsers()
    by_rule = {cli.env_name(a.option_strings[0]) for c in MODEL_COMMANDS for a in _options(commands[c])}
    # Read by the library or the server themselves, not through a flag.
    own = {"SMOLCANDLE_HOME", "SMOLCANDLE_SIMD", "SMOLCANDLE_API_KEY", "SMOLCANDLE_CACHE", "SMOLCANDLE_<NAME>"}
    named = set(re.findall(r"SMOLCANDLE_[A-Z_<>]+", USAGE))
    assert not named - by_rule - own, sorted(named - by_rule - own)


def test_the_load_signature_in_the_guide_is_the_code_s():
    quoted = re.search(r"`Model\.load\(path, \*, (.*?)\)`", USAGE, re.S)
    assert quoted is not None, "docs/usage.md quotes no Model.load signature"
    documented = {part.split("=")[0].strip() for part in quoted.group(1).replace("\n", " ").split(",")}
    actual = {n for n, p in inspect.signature(smolcandle.Model.load).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert documented == actual


def test_the_defaults_the_guide_quotes_are_the_engine_s():
    assert f"(default {DEFAULTS['queued_per_active']} per active place)" in USAGE
    assert f"`--prefix-cache-mib` (default {DEFAULTS['prefix_cache_bytes'] >> 20})" in USAGE
    assert f"default {DEFAULTS['chat_max_tokens']}" in USAGE
