"""The flows' parameter models are the one definition of their command-line options: every field has an option,
an empty command line builds the model's defaults, and each option's text reaches its field."""

from __future__ import annotations

import argparse
import re
from typing import get_args

import pytest

from flows.cli import OPTIONS, _camvid_root, _choice, _here, _model_from, get_parser
from flows.parameters import PROJECT, BenchmarkChoice, CampaignChoice, ClusterChoice

# Each model, in every command that takes its options (with the positional arguments the command needs).
USES = [(CampaignChoice, ["campaign"]), (CampaignChoice, ["round", "1"]), (CampaignChoice, ["human", "query", "0"]),
        (CampaignChoice, ["human", "train", "0"]), (CampaignChoice, ["pipeline"]),
        (ClusterChoice, ["campaign"]), (ClusterChoice, ["round", "1"]), (BenchmarkChoice, ["benchmark"])]


def options_of(command: list[str]) -> dict[str, argparse.Action]:
    """The options of a (sub)command, by the attribute they set."""
    parser = get_parser()
    for word in (w for w in command if not w.isdigit()):
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[word]
    return {action.dest: action for action in parser._actions}


@pytest.fixture
def in_project(monkeypatch):
    monkeypatch.chdir(PROJECT)  # a relative path on the command line is then the project's, as in a flow run
    monkeypatch.delenv("PIXELPICK_CAMVID_ROOT", raising=False)


@pytest.mark.parametrize("model, command", USES, ids=lambda x: " ".join(x) if isinstance(x, list) else x.__name__)
def test_every_field_is_an_option_and_no_options_give_the_models_defaults(in_project, model, command):
    options = options_of(command)
    for name, info in model.model_fields.items():
        assert name in options, f"{model.__name__}.{name} has no option in `pixelpick {' '.join(command)}`"
        assert info.description in options[name].help.replace("%%", "%")

    built = _model_from(model, get_parser().parse_args(command)).model_dump()
    for name, default in model().model_dump().items():
        if name in OPTIONS[model] and OPTIONS[model][name].parse in (_here, _camvid_root):
            default = default and str(PROJECT / default)  # resolved from the current folder, here the project
        assert built[name] == default, name


def test_each_option_reaches_its_field(in_project, monkeypatch, tmp_path):
    args = get_parser().parse_args([
        "benchmark", "--preset", "gpu-quick", "--protocol", "tune", "--params", "other.yaml", "--set", "train.epochs=2",
        "--set", "data.size=[8, 8]", "--strategies", "margin,entropy", "--seeds", "0,1", "--variant", "sp300",
        "--variant", "sp300+st0.9", "--workdir", str(tmp_path / "runs"), "--report-dir", "reports", "--report-only"])
    monkeypatch.setenv("PIXELPICK_CAMVID_ROOT", "camvid")  # the folder's default, read when the command runs
    assert _model_from(BenchmarkChoice, args) == BenchmarkChoice(
        preset="gpu-quick", protocol="tune", params=str(PROJECT / "other.yaml"),
        overrides={"train.epochs": 2, "data.size": [8, 8]}, camvid_root=str(PROJECT / "camvid"),
        strategies=["margin", "entropy"], seeds=[0, 1], variants=["sp300", "sp300+st0.9"],
        workdir=str(tmp_path / "runs"), report_dir=str(PROJECT / "reports"), report_only=True)

    args = get_parser().parse_args(["round", "2", "--workers", "3", "--dask-address", "tcp://here:8786",
                                    "--shards", "6", "--set", "acquire.strategy=entropy", "--campaign", "mine"])
    assert _model_from(ClusterChoice, args) == ClusterChoice(workers=3, address="tcp://here:8786", shards=6)
    assert _choice(args) == CampaignChoice(params=str(PROJECT / "params.yaml"),
                                           overrides={"acquire.strategy": "entropy", "campaign.name": "mine"})


def test_the_benchmark_models_names_are_the_librarys():
    # Named in flows.parameters without importing pixelpick.benchmark (torch), which the command line must not.
    from pixelpick.benchmark import PRESETS, PROTOCOLS, VARIANT_KEYS

    assert set(get_args(BenchmarkChoice.model_fields["protocol"].annotation)) == set(PROTOCOLS)
    preset_help = BenchmarkChoice.model_fields["preset"].description
    assert all(name in preset_help for name in PRESETS), preset_help
    assert BenchmarkChoice().preset in PRESETS
    variant_help = BenchmarkChoice.model_fields["variants"].description
    assert set(re.findall(r"\b([a-z]{2})[0-9.]+\b", variant_help)) == set(VARIANT_KEYS), variant_help


def test_a_bad_protocol_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stopped:
        get_parser().parse_args(["benchmark", "--protocol", "final"])
    assert stopped.value.code == 2 and "invalid choice: 'final'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "flag"), [(["benchmark", "--seeds", "0,x"], "--seeds"),
                                             (["round", "1", "--shards", "0"], "--shards")])
def test_a_value_the_model_refuses_is_one_line_naming_the_option(in_project, argv, flag):
    from pixelpick.errors import SettingsError

    args = get_parser().parse_args(argv)
    model = BenchmarkChoice if argv[0] == "benchmark" else ClusterChoice
    with pytest.raises(SettingsError, match=rf"^{flag}: ") as refused:
        _model_from(model, args)
    assert "\n" not in str(refused.value)


def test_the_command_line_does_not_import_torch():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, flows.cli; flows.cli.get_parser(); "
                           "print('torch' in sys.modules, 'prefect' in sys.modules)"],
                          cwd=PROJECT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"], done.stdout
