"""The `localllm` command end to end, as a user runs it (real processes, real model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.cli.error_words import cli_message
from localllm.core.errors import NotSupported

SHOW_KEYS = [
    "name", "path", "format", "architecture", "parameters", "quantization", "size_bytes",
    "context_length", "n_layers", "n_heads", "n_kv_heads", "head_dim", "sliding_window",
    "vocab_size", "has_chat_template", "chat_template_source",
]


def localllm(home: Path, *args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A store with the starter pulled once for this module."""
    where = tmp_path_factory.mktemp("home")
    result = localllm(where, "pull", "starter", "--quiet")
    assert result.returncode == 0, result.stderr
    return where


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_version():
    result = localllm(Path("/nonexistent-home"), "--version")
    assert result.returncode == 0 and result.stdout.startswith("localllm ")


def test_ls_json_lists_the_pulled_starter(home):
    rows = json.loads(localllm(home, "ls", "--json").stdout)
    assert [r["name"] for r in rows] == ["starter"]
    assert rows[0]["size_bytes"] == 253_113_024
    assert rows[0]["sha256"].startswith("a5fd3b62")
    assert rows[0]["quantization"] == "Q4_K_M"
    manifest = json.loads((home / "manifests" / "starter.json").read_text())
    assert {"name", "source", "file", "sha256", "size", "format", "added"} <= manifest.keys()


def test_ls_table(home):
    out = localllm(home, "ls").stdout.splitlines()
    assert out[0].split() == ["NAME", "SIZE", "QUANT", "PARAMS", "CONTEXT", "ADDED"]
    assert out[1].split()[0] == "starter" and "Q4_K_M" in out[1]


def test_show_json_has_exactly_the_documented_keys(home):
    result = localllm(home, "show", "starter", "--json")
    facts = json.loads(result.stdout)
    assert list(facts) == SHOW_KEYS
    assert facts["architecture"] == "gemma3"
    assert (facts["n_layers"], facts["n_heads"], facts["n_kv_heads"], facts["head_dim"]) == (18, 4, 1, 256)
    assert facts["sliding_window"] == 512 and facts["vocab_size"] == 262_144
    assert facts["has_chat_template"] is False and facts["chat_template_source"] == "builtin:gemma"


def test_show_a_gguf_path(home):
    path = next((home / "models").rglob("*.gguf"))
    facts = json.loads(localllm(home, "show", str(path), "--json").stdout)
    assert facts["name"] == path.name and facts["quantization"] == "Q4_K_M"


def test_run_raw_greedy_streams_the_reference_text(home):
    result = localllm(home, "run", "starter", "The capital of France is", "--raw", "--temperature", "0",
                      "--max-tokens", "8", "--stats", "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" the capital of the country of France")
    assert "TTFT" in result.stderr and "tok/s" in result.stderr


def test_run_reads_a_piped_prompt_and_prints_only_the_reply(home):
    result = localllm(home, "run", "starter", "--raw", "--temperature", "0", "--max-tokens", "6",
                      stdin="The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no llama.cpp log unless --verbose
    assert result.stdout.startswith(" the capital of the country")


def test_run_stop_string(home):
    result = localllm(home, "run", "starter", "The capital of France is", "--raw", "--temperature", "0",
                      "--max-tokens", "30", "--stop", "country")
    assert result.stdout == " the capital of the \n"


def test_line_chat_from_piped_input(home):
    result = localllm(home, "chat", "starter", "--temperature", "0", "--max-tokens", "8",
                      stdin="Hello there\n/clear\nWhat is 2+2?\n/bye\n")
    assert result.returncode == 0, result.stderr
    assert "conversation cleared" in result.stderr


def test_info_json(home):
    facts = json.loads(localllm(home, "info", "--json").stdout)
    for key in ("os", "python", "cpu_model", "physical_cores", "logical_cores", "ram_total_bytes",
                "ram_available_bytes", "gpus", "llama_cpp", "torch_version", "torch_cuda_available"):
        assert key in facts, key
    assert facts["llama_cpp"]["installed"] is True
    assert facts["gpus"] == [] or all("vram_total_bytes" in g for g in facts["gpus"])


def test_rm_removes_files_and_manifest(tmp_path):
    assert localllm(tmp_path, "pull", "starter", "--quiet").returncode == 0
    assert localllm(tmp_path, "rm", "starter").returncode == 0
    assert json.loads(localllm(tmp_path, "ls", "--json").stdout) == []
    assert not list((tmp_path / "models").rglob("*.gguf"))
    line = one_line_error(localllm(tmp_path, "rm", "starter"))
    assert "not installed" in line


def test_unknown_model_is_one_line_exit_1(tmp_path):
    line = one_line_error(localllm(tmp_path, "run", "no-such-model", "hi"))
    assert "no-such-model" in line


def test_missing_gguf_path(tmp_path):
    line = one_line_error(localllm(tmp_path, "show", str(tmp_path / "absent.gguf")))
    assert "does not exist" in line


def test_truncated_gguf(home, tmp_path):
    source = next((home / "models").rglob("*.gguf"))
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as src:
        cut.write_bytes(src.read(100 * 1024 * 1024))
    for verb in (["show"], ["run"]):
        args = [*verb, str(cut)] + (["hi", "--raw"] if verb == ["run"] else [])
        line = one_line_error(localllm(tmp_path, *args))
        assert "truncated" in line


def test_non_gguf_file(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("just some text, not a model\n" * 10)
    line = one_line_error(localllm(tmp_path, "run", str(text), "hi"))
    assert "GGUF" in line


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "hot"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-3"], "--top-k"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--ctx", "8"], "--ctx"),
        (["--threads", "0"], "--threads"),
        (["--seed", "-5"], "--seed"),
        (["--ctx", "99999999"], "trained"),
    ],
)
def test_invalid_flag_values_are_one_line_exit_1(home, flags, words):
    line = one_line_error(localllm(home, "run", "starter", "hi", *flags))
    assert words in line


def test_a_prompt_longer_than_the_context_names_the_flag(home):
    line = one_line_error(localllm(home, "run", "starter", "word " * 100, "--raw", "--ctx", "32"))
    assert re.search(r"the prompt has \d+ tokens but the context holds 32", line)
    assert line.endswith("raise the context size (--ctx)")


def test_a_feature_the_backend_lacks_names_the_backend_that_has_it():
    assert cli_message(NotSupported("native", "grammars", alternative="llamacpp")) == (
        "the native backend does not support grammars; use --backend llamacpp"
    )


def test_usage_errors_exit_2(tmp_path):
    assert localllm(tmp_path, "run").returncode == 2
    assert localllm(tmp_path, "ls", "--no-such-flag").returncode == 2
    assert localllm(tmp_path).returncode == 2


def test_pull_of_unknown_name_is_one_line(tmp_path):
    line = one_line_error(localllm(tmp_path, "pull", "llama9:400b"))
    assert "llama9:400b" in line


def test_default_store_is_the_xdg_data_home_and_nothing_goes_to_cache(tmp_path):
    fake_home = tmp_path / "user"
    fake_home.mkdir()
    env = {**os.environ, "HOME": str(fake_home)}
    env.pop("LOCALLLM_HOME", None)
    env.pop("XDG_DATA_HOME", None)
    result = subprocess.run([sys.executable, "-m", "localllm", "pull", "starter", "--quiet"],
                            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert (fake_home / ".local/share/localllm/manifests/starter.json").is_file()
    assert not (fake_home / ".cache").exists()
