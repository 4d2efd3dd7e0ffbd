"""One size grammar for every size flag: binary units, decimals, a bare number is bytes (localllm/core/units.py)."""

from __future__ import annotations

import pytest

from localllm.cli.parser import build_parser, parse_command_line
from localllm.core.errors import BadRequest
from localllm.core.units import GIB, MIB, SIZE_HELP

SIZE_FLAGS = {  # flag -> a command line that takes it, and the attribute it lands in
    "--kv-cache": (["run", "starter", "hi"], "kv_cache"),
    "--max-body": (["serve"], "max_body"),
    "--vram": (["fit", "starter"], "vram"),
    "--ram": (["fit", "starter"], "ram"),
}


@pytest.mark.parametrize("flag", SIZE_FLAGS)
def test_every_size_flag_reads_sizes_one_way(flag):
    verb, attribute = SIZE_FLAGS[flag]

    def size(text: str) -> int:
        return getattr(parse_command_line([*verb, flag, text]), attribute)

    assert size("2GB") == size("2GiB") == size("2G") == size("2g") == 2 * GIB
    assert size("7.5GiB") == int(7.5 * GIB) and size("512MiB") == size("0.5GiB") == 512 * MIB
    assert size("1048576") == 1048576  # a bare number is bytes, for every flag
    with pytest.raises(BadRequest, match=f"^{flag} must be a size such as"):
        size("lots")
    with pytest.raises(BadRequest, match=f"^{flag} is too large"):
        size("9" * 400)


def test_the_help_says_what_a_bare_number_means():
    verbs = {a.dest: a for a in build_parser()._actions if a.dest == "command"}
    for flag, (verb, _) in SIZE_FLAGS.items():
        sub = verbs["command"].choices[verb[0]]
        (action,) = [a for a in sub._actions if flag in a.option_strings]
        assert SIZE_HELP in action.help and "bare number is bytes" in SIZE_HELP


def test_max_body_default_is_8_mib():
    assert parse_command_line(["serve"]).max_body == 8 * MIB
