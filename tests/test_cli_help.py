"""`pixelpick <command> --help` works for every command of the one parser, as a user runs it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import get_parser

REPO = Path(__file__).resolve().parents[1]


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand, read from the parser itself so a new one is covered without editing this."""
    paths = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                paths += command_paths(subparser, (*path, name))
    return paths


COMMANDS = command_paths(get_parser())


def test_the_parser_has_the_nested_commands():
    assert {("annotate", "serve"), ("annotate", "export-labels"), ("annotate", "split-job"), ("human", "query"),
            ("human", "train")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pixelpick")
def test_help_exits_zero_and_names_the_command(command):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["pixelpick", *command, "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {' '.join(('pixelpick', *command))} "), done.stdout
    assert done.stderr == ""


def test_the_annotator_module_shares_the_commands():
    done = subprocess.run([sys.executable, "-m", "pixelpick.annotation", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--allowed-host" in done.stdout, done.stderr
