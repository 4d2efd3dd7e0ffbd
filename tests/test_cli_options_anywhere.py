"""Options before, between and after the positionals, for every verb (as Ollama and llama.cpp users type them)."""

from __future__ import annotations

import json

import pytest

from localllm.cli.parser import build_parser, parse_command_line
from test_cli import home, localllm, one_line_error  # noqa: F401  (the module's pulled-starter fixture)

# verb -> (positionals, option groups); each group is one option with its values
VERBS = {
    "pull": (["starter"], [["--quiet"]]),
    "ls": ([], [["--json"], ["--catalog"]]),
    "rm": (["starter"], [["--debug"]]),
    "show": (["starter"], [["--json"], ["--debug"]]),
    "run": (["starter", "Hello there"], [["--temperature", "0"], ["--raw"], ["--stop", "a"], ["--stats"], ["--stop", "b"],
                                          ["--ctx", "512"], ["--threads", "2"]]),
    "chat": (["starter"], [["--top-k", "20"], ["--seed", "1"], ["--stop", "X"], ["--min-p", "0.1"], ["--plain"],
                           ["--repeat-penalty", "1.1"], ["--system", "be brief"]]),
    "serve": (["starter"], [["--port", "0"], ["--cors-origin", "http://a"], ["--keep-alive", "0"], ["--cors-origin", "http://b"]]),
    "fit": (["starter"], [["--json"], ["--ctx", "512"], ["--vram", "8GiB"]]),
    "bench": (["starter"], [["--concurrency", "1,2"], ["--max-tokens", "4"], ["--url", "http://127.0.0.1:1/v1"]]),
    "info": ([], [["--json"], ["--debug"]]),
    "service": (["status"], [["--debug"]]),
}


def orderings(positionals: list[str], groups: list[list[str]]) -> dict[str, list[str]]:
    """The same command with its options before, between (spread over every gap) and after the positionals."""
    flat = [word for group in groups for word in group]
    spread: list[str] = []
    slots = len(positionals) + 1
    per_gap = -(-len(groups) // slots)  # in order, so repeated options keep theirs
    for gap in range(slots):
        spread += [word for group in groups[gap * per_gap : (gap + 1) * per_gap] for word in group]
        if gap < len(positionals):
            spread.append(positionals[gap])
    return {"before": flat + positionals, "between": spread, "after": positionals + flat}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_takes_options_anywhere(verb):
    positionals, groups = VERBS[verb]
    parsed = {where: vars(parse_command_line([verb, *argv])) for where, argv in orderings(positionals, groups).items()}
    assert parsed["before"] == parsed["between"] == parsed["after"], parsed
    assert parsed["after"]["command"] == verb
    reference = vars(build_parser().parse_args([verb, *positionals, *[w for g in groups for w in g if w != "--debug"]]))
    reference["debug"] = ["--debug"] in groups
    assert parsed["after"] == reference  # the same values argparse gives when options come last


def test_orderings_really_move_the_options():
    positionals, groups = VERBS["run"]
    spread = orderings(positionals, groups)["between"]
    assert spread.index("starter") > 0 and spread.index("Hello there") < len(spread) - 1
    assert spread.index("starter") + 1 < spread.index("Hello there")  # something between the two


def test_repeated_stop_keeps_every_value_in_order():
    args = parse_command_line(["run", "--stop", "a", "starter", "--stop", "b", "hi", "--stop", "c"])
    assert args.stop == ["a", "b", "c"] and (args.model, args.prompt) == ("starter", "hi")


def test_a_prompt_that_starts_with_a_dash_after_double_dash():
    args = parse_command_line(["run", "starter", "--temperature", "0", "--", "--stats is a flag"])
    assert args.prompt == "--stats is a flag" and args.stats is False and args.temperature == 0
    args = parse_command_line(["run", "--raw", "starter", "--", "-5 degrees"])
    assert args.prompt == "-5 degrees" and args.raw


def test_debug_goes_anywhere_before_double_dash_only():
    assert parse_command_line(["run", "starter", "hi", "--debug"]).debug
    args = parse_command_line(["run", "starter", "--", "--debug"])
    assert args.prompt == "--debug" and not args.debug


def test_usage_errors_still_name_the_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_command_line(["run", "starter", "one", "two"])
    assert exit_.value.code == 2 and "localllm run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_command_line(["nosuchverb", "x"])
    assert "invalid choice" in capsys.readouterr().err


# -- through the real command, in a subprocess ----------------------------------------------------
@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_run_greedy_gives_the_same_text_wherever_the_options_go(home, where):  # noqa: F811
    groups = [["--raw"], ["--temperature", "0"], ["--max-tokens", "6"], ["--threads", "2"], ["--stats"], ["--ctx", "256"]]
    argv = orderings(["starter", "The capital of France is"], groups)[where]
    result = localllm(home, "run", *argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" the capital of the country")
    assert "tok/s" in result.stderr  # --stats reached the command


def test_show_and_fit_with_options_first(home):  # noqa: F811
    shown = localllm(home, "show", "--json", "starter")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["architecture"] == "gemma3"
    fit = localllm(home, "fit", "--ctx", "512", "starter", "--json")
    assert fit.returncode == 0, fit.stderr
    assert json.loads(fit.stdout)["context_length"] == 512


def test_run_prompt_after_double_dash(home):  # noqa: F811
    result = localllm(home, "run", "starter", "--raw", "--temperature", "0", "--max-tokens", "3", "--", "-1 plus 1 is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_a_bad_value_between_positionals_is_still_one_line_exit_1(home):  # noqa: F811
    line = one_line_error(localllm(home, "run", "starter", "--top-p", "1.5", "hi"))
    assert "--top-p" in line
