"""The command line: its verbs in order, each verb's help, errors as one line and exit status 2."""

from __future__ import annotations

import importlib

import pytest

from supanalysis import commands
from supanalysis.cli import main
from supanalysis.commands import info
from supanalysis.durable import WriteError


def _verbs(parser) -> list[str]:
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return list(sub.choices)


def test_verbs_in_order():
    assert _verbs(commands.build_parser()) == ["info", "test", "demo", "toy", "planted"]


@pytest.mark.parametrize("verb", commands.VERBS)
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: supanalysis {verb} ")


def test_a_missing_verb_module_is_left_out_but_a_missing_dependency_is_raised(monkeypatch):
    real = importlib.import_module

    def missing(name: str, what: str):
        def fake(module_name, *args):
            if module_name == name:
                raise ModuleNotFoundError(f"No module named {what!r}", name=what)
            return real(module_name, *args)

        return fake

    monkeypatch.setattr(importlib, "import_module", missing("supanalysis.commands.demo", "supanalysis.commands.demo"))
    assert "demo" not in _verbs(commands.build_parser())
    monkeypatch.setattr(importlib, "import_module", missing("supanalysis.commands.demo", "matplotlib"))
    with pytest.raises(ModuleNotFoundError, match="matplotlib"):
        commands.build_parser()


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("supanalysis ") and "\nbackends:\n" in out


def test_test_without_models_is_a_one_line_error(capsys):
    assert main(["test", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err == "supanalysis test: error: need --config or all of --model-a, --model-b and --tokens\n"


def test_resume_needs_a_checkpoint_dir(capsys):
    assert main(["test", "--model-a", "a", "--model-b", "b", "--tokens", "t.npy", "--resume"]) == 2
    assert capsys.readouterr().err == "supanalysis test: error: --resume needs --checkpoint-dir\n"


def test_a_failed_write_is_a_one_line_error(monkeypatch, capsys):
    def full_disk(args):
        raise WriteError(28, "cannot write out/report.json: No space left on device")

    monkeypatch.setattr(info, "run", full_disk)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supanalysis info: error: ") and err.count("\n") == 1
    assert "cannot write out/report.json: No space left on device" in err


@pytest.mark.parametrize("verb", commands.VERBS)
def test_each_verb_runs_its_own_module(verb):
    args = commands.build_parser().parse_args([verb])
    assert args.command == verb
    assert args.func is commands.verb_module(verb).run
