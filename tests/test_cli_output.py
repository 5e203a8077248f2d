"""What the commands tell a new user: the figures line, progress bars only on a terminal, refusals before the
weights load, defaults in --help."""

import pytest

from consistency_traces import FLAME
from offload_engine.cli.main import main
from test_bad_input import copy_of, good_dir, run_cli  # noqa: F401 (good_dir: a fixture)
from tiny_tokenizer import save_char_tokenizer

BAR = "%|"  # tqdm's bar: "42%|████      | 5/12"


@pytest.fixture
def model(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    save_char_tokenizer(path)
    return path


def generate(capsys, model, *flags):
    code, err = run_cli(capsys, "generate", "--model", str(model), "--prompt", "ab", "--max-new-tokens", "4", *flags)
    assert code == 0, err
    return err


def test_the_figures_line_counts_the_experts_computed_on_the_cpu(model, capsys):
    line = generate(capsys, model, "--expert-slots", "2", "--cold-experts", "cpu", "--quiet")[-1]
    assert " experts on CPU (" in line and " s)" in line
    count = int(line.split(" experts on CPU")[0].rsplit("| ", 1)[1])
    assert count > 0
    assert " experts on CPU" not in generate(capsys, model, "--expert-slots", "2", "--quiet")[-1]  # none: not said


def test_progress_bars_only_on_a_terminal(model, capsys, monkeypatch):
    """Loading draws bars (weights to the device); into a file or a pipe they would be lines of carriage
    returns, so there the command draws none, --quiet or not."""
    assert not any(BAR in line for line in generate(capsys, model))
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert any(BAR in line for line in generate(capsys, model))
    assert not any(BAR in line for line in generate(capsys, model, "--quiet"))


def test_simulate_shows_its_progress_on_a_terminal(capsys, monkeypatch):
    argv = ["simulate", str(FLAME), "--num-experts", "64", "--slots", "24", "--policies", "lru"]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "replaying" in err and BAR in err
    assert main([*argv, "--quiet"]) == 0 and BAR not in capsys.readouterr().err


def test_chat_without_a_template_is_refused_before_the_weights_load(model, capsys, monkeypatch):
    from offload_engine import engine
    from test_bad_input import assert_one_line_error

    (model / "chat_template.jinja").unlink()

    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(engine, "load", load)
    code, err = run_cli(capsys, "generate", "--model", str(model), "--chat", "--quiet")
    assert_one_line_error(code, err, "no chat template", "--chat")


def _flags(parser, name="moe-offload"):
    """(command, parser, action) of every option flag of every command, subcommands included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _flags(subparser, f"{name} {sub}")
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield name, parser, action


def test_help_shows_every_default(capsys):
    """A flag with a default says it in --help (a switch's is off); generate's were missing."""
    import argparse

    from offload_engine.cli.main import build_parser

    for command, parser, action in _flags(build_parser()):
        if action.default is None or isinstance(action, argparse._StoreTrueAction):
            continue  # decided at run time (the help says how) or a switch
        assert "default" in parser._get_formatter()._expand_help(action), (command, action.option_strings)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("tokens to generate at most (default: 64)", "(default: 'The')", "0 = greedy (default: 0.0)",
                  "(default: 1.0)", "prompts per batch to plan for (default: 1)"):
        assert shown in text


def test_the_defaults_help_shows_are_the_engines():
    """The CLI's defaults are the Python API's: one value each, where both have the flag."""
    import inspect

    from offload_engine import OffloadEngine
    from offload_engine.cli.main import build_parser
    from offload_engine.run_config import DEFAULT_MAX_CONTEXT

    parser = build_parser()
    flags = {a.dest: a for command, _, a in _flags(parser) if command == "moe-offload generate"}
    for method in (OffloadEngine.generate, OffloadEngine.from_pretrained):
        for name, param in inspect.signature(method).parameters.items():
            if name in flags and param.default is not inspect.Parameter.empty:
                assert flags[name].default == param.default, name
    assert f"min(model, {DEFAULT_MAX_CONTEXT})" in flags["max_context"].help
