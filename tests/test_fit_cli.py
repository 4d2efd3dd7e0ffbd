"""`localllm fit` end to end, plans for models still on the hub (Range reads), and `pull` picking a quant.

Real `python -m localllm` processes on the real starter; the hub is
tests/hub_emulator.py on 127.0.0.1, which logs every Range it serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.core.config import Paths
from localllm.core.errors import DoesNotFit
from localllm.fit import HardwareWishes, hypothetical, plan_fit
from localllm.fit.machine import probe
from localllm.fit.hub_model import hub_model, pull_with_plan
from localllm.core.units import GIB, MIB
from localllm.core.modelinfo import read_model_info
from localllm.store import hub_header
from localllm.store.refs import parse_ref
from localllm.store.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent))
from builders import zero_llama_shards  # noqa: E402
from hub_emulator import HubEmulator, split_gguf  # noqa: E402

KEYS = [
    "fits", "backend", "n_gpu_layers", "context_length", "parallel", "kv_bytes", "ram_bytes", "vram_bytes", "reasons",
    "alternatives", "weights", "decode_tok_s", "throughput_tok_s", "candidates",
]
QWEN_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"  # the catalog's repository for qwen2.5:0.5b


def localllm(home: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args],
        input="", capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "LOCALLLM_HOME": str(home), **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def emulator(starter_gguf, tiny_gguf, tmp_path_factory):
    """Repositories: the starter as one quant, split in 3, and a catalog repo with three quants of different sizes."""
    work = tmp_path_factory.mktemp("fit-hub")
    parts = split_gguf(starter_gguf, work / "starter-Q4_K_M", 3)
    bigger = work / "q8.gguf"  # the starter's bytes padded to a Q8_0-like size (sparse: no disk)
    shutil.copyfile(starter_gguf, bigger)
    os.truncate(bigger, 420 * 1024 * 1024)
    hub = HubEmulator()
    hub.add_repo("test-org/Starter-GGUF", {"starter-Q4_K_M.gguf": starter_gguf})
    hub.add_repo("test-org/Split-GGUF", {p.name: p for p in parts})
    hub.add_repo("test-org/Tiny-Llama", zero_llama_shards(work / "tiny-llama"))
    hub.add_repo(
        QWEN_REPO,
        {
            "qwen2.5-0.5b-instruct-q4_k_m.gguf": starter_gguf,
            "qwen2.5-0.5b-instruct-q8_0.gguf": bigger,
            "qwen2.5-0.5b-instruct-q2_k.gguf": tiny_gguf,  # 6.5 MB: plays a 2-bit quant
        },
    )
    with hub:
        yield hub


@pytest.fixture
def hub(emulator, monkeypatch):
    return emulator.serve_as_the_hub(monkeypatch)


def cpu_machine(ram: int):
    return hypothetical(probe(), HardwareWishes(vram=0, ram=ram))


# -- the command ------------------------------------------------------------------------


def test_fit_json_has_the_issue_keys_and_exit_0_when_it_fits(tmp_path, starter_gguf):
    result = localllm(tmp_path, "fit", str(starter_gguf), "--json", "--vram", "0")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert list(plan) == KEYS
    assert (plan["fits"], plan["backend"], plan["n_gpu_layers"], plan["vram_bytes"]) == (True, "llamacpp", 0, 0)
    assert plan["context_length"] == 8192  # capped at 8192 below the trained 32768
    assert plan["kv_bytes"] == 18 * 8192 * 256 * 2 * 2  # every layer at the full context (llama.cpp's full window cache)
    assert any("sliding-window" in r for r in plan["reasons"])


def test_fit_json_predicts_the_starters_decode_speed_on_this_cpu_for_every_candidate(tmp_path, starter_gguf):
    result = localllm(tmp_path, "fit", str(starter_gguf), "--json", "--vram", "0", "--parallel", "4")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["backend"], plan["weights"]) == ("llamacpp", "Q4_K_M")
    candidates = {(c["backend"], c["weights"]): c for c in plan["candidates"]}
    llama = candidates["llamacpp", "Q4_K_M"]
    assert llama["fits"] and llama["auto"] and llama["decode_tok_s"] == plan["decode_tok_s"] > 0
    assert llama["throughput_tok_s"] == plan["throughput_tok_s"] > plan["decode_tok_s"]  # 4 requests batched in a step
    assert plan["throughput_tok_s"] < 4 * plan["decode_tok_s"]  # ...but each adds its own compute on the CPU
    assert {w for b, w in candidates if b == "native"} == {"float32", "bfloat16", "int8", "int4"}  # fp8: CUDA only
    for c in plan["candidates"]:
        assert c["parallel"] == 4 and c["decode_tok_s"] > 0 and c["read_bytes_per_token"] > 0
        assert c["backend"] == "llamacpp" or (c["device"] == "cpu" and not c["auto"])  # a GGUF on the CPU: llama.cpp
    # fewer bytes a token, faster: float32 reads twice bfloat16's bytes
    assert candidates["native", "float32"]["read_bytes_per_token"] > 1.9 * candidates["native", "bfloat16"]["read_bytes_per_token"]
    assert any(r.startswith("predicted decode") and "measured" in r for r in plan["reasons"])
    text = localllm(tmp_path, "fit", str(starter_gguf), "--vram", "0")
    speed = next(line for line in text.stdout.splitlines() if line.startswith("speed"))
    assert "llama.cpp Q4_K_M" in speed and "tok/s predicted; runner-up native" in speed


def test_fit_on_a_named_hypothetical_card_uses_its_bandwidth(tmp_path, starter_gguf):
    args = ["fit", str(starter_gguf), "--vram", "24GiB", "--ram", "32GiB", "--json"]
    unknown = json.loads(localllm(tmp_path, *args).stdout)
    rtx = json.loads(localllm(tmp_path, *args, "--gpu-name", "RTX 4090").stdout)
    assert any("spec sheet" in r and "RTX 4090" in r for r in rtx["reasons"])
    assert rtx["decode_tok_s"] > unknown["decode_tok_s"]  # 1,008 GB/s against the default's 300


def test_fit_on_a_hypothetical_12_gib_card(tmp_path, starter_gguf):
    result = localllm(tmp_path, "fit", str(starter_gguf), "--vram", "12GiB", "--json")
    plan = json.loads(result.stdout)
    assert result.returncode == 0 and plan["n_gpu_layers"] == 19 and plan["vram_bytes"] > plan["kv_bytes"]
    text = localllm(tmp_path, "fit", str(starter_gguf), "--vram", "12GiB", "--compute-capability", "8.6")
    assert text.returncode == 0
    assert "verdict  fits: llamacpp, all 19 layers on the GPU, context 8192" in text.stdout
    assert "compute 8.6" in text.stdout and "why:" in text.stdout


def test_fit_that_does_not_fit_prints_the_plan_and_exits_1(tmp_path, starter_gguf):
    result = localllm(tmp_path, "fit", str(starter_gguf), "--ram", "200MiB", "--vram", "0")
    assert result.returncode == 1 and result.stderr == ""
    assert "verdict  does not fit" in result.stdout
    assert "does not fit: needs" in result.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--vram", "lots"], "--vram must be a size"),
        (["--vram", "8GiB", "--compute-capability", "89"], "--compute-capability must look like 8.9"),
        (["--ctx", "100000"], "trained for"),
        (["--gpus", "2"], "give --vram"),
        (["--parallel", "0"], "--parallel must be at least 1"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, starter_gguf, args, says):
    assert says in one_line_error(localllm(tmp_path, "fit", str(starter_gguf), *args))


def test_usage_errors_exit_2_and_a_missing_model_is_one_line(tmp_path, starter_gguf):
    assert localllm(tmp_path, "fit", str(starter_gguf), "--backend", "fast").returncode == 2
    assert "does not exist" in one_line_error(localllm(tmp_path, "fit", str(tmp_path / "nope.gguf")))
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    assert "cannot reach the model hub" in one_line_error(localllm(tmp_path, "fit", "llama3.1:8b", env=offline))


def test_a_forced_backend_that_cannot_fit_is_refused_with_the_plans_reasons(tmp_path, starter_gguf):
    tight = {"LOCALLLM_FIT_RAM_MARGIN": "0.9999"}  # leaves no usable RAM
    line = one_line_error(localllm(tmp_path, "run", str(starter_gguf), "hi", "--backend", "llamacpp", env=tight))
    assert line.startswith("error: --backend llamacpp cannot run") and "does not fit: needs" in line
    line = one_line_error(localllm(tmp_path, "run", str(starter_gguf), "hi", env=tight))
    assert "no backend can run" in line


def test_run_follows_the_plans_context(tmp_path, starter_gguf):
    args = ("run", str(starter_gguf), "The capital of France is", "--raw", "--max-tokens", "2", "--temperature", "0", "--verbose")
    result = localllm(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert re.search(r"n_ctx\s+= 8192\b", result.stderr)  # llama.cpp's own log: the plan's context, not the old 4096
    assert re.search(r"n_ctx\s+= 2048\b", localllm(tmp_path, *args, "--ctx", "2048").stderr)  # --ctx still wins


def test_info_shows_each_installed_models_plan(tmp_path, starter_gguf):
    store = ModelStore(Paths(tmp_path))
    target = store.folder_for("starter") / "model.gguf"
    os.link(starter_gguf, target)  # a hard link: the store refuses symbolic links it did not make
    store.add("starter", source="test", file=target, sha256="0" * 64)
    result = localllm(tmp_path, "info")
    assert "fit          starter: fits: llamacpp" in result.stdout
    facts = json.loads(localllm(tmp_path, "info", "--json").stdout)
    assert list(facts["fit"]["starter"]) == KEYS


# -- models on the hub: Range reads of the header ----------------------------------------


def test_fit_plans_a_hub_model_from_its_header_without_downloading_it(hub, tmp_path, starter_gguf):
    result = localllm(tmp_path, "fit", "hf:test-org/Starter-GGUF:Q4_K_M", "--json", "--vram", "0", env={"HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout)
    local = plan_fit(read_model_info(starter_gguf), cpu_machine(64 * GIB)).to_dict()
    assert (remote["kv_bytes"], remote["context_length"]) == (local["kv_bytes"], local["context_length"])
    assert remote["reasons"][0].startswith("not downloaded: planned from the hub's listing and the GGUF header")
    served = hub.gets("starter-Q4_K_M.gguf")
    assert served and all(s.status == 206 and s.range.startswith("bytes=") for s in served)
    fetched = sum(int(s.range.split("-")[1]) - int(s.range.split("=")[1].split("-")[0]) + 1 for s in served)
    assert fetched <= 16 * MIB  # a header, not the 253 MB file
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("*.gguf"))


def test_a_header_longer_than_the_first_read_is_read_on(hub, monkeypatch, starter_gguf):
    monkeypatch.setattr(hub_header, "HEADER_FIRST_READ", 256 * 1024)
    ref = "hf:test-org/Starter-GGUF:Q4_K_M"
    info = hub_model(ref, parse_ref(ref), cpu_machine(8 * GIB)).info
    ranges = [s.range for s in hub.gets("starter-Q4_K_M.gguf")]
    assert ranges[:3] == ["bytes=0-262143", "bytes=262144-524287", "bytes=524288-1048575"]  # doubling, never re-read
    local = read_model_info(starter_gguf)
    assert (info.layer_weight_bytes, info.layer_repack_bytes, info.token_embd_bytes) == (
        local.layer_weight_bytes, local.layer_repack_bytes, local.token_embd_bytes
    )
    assert (info.sliding_window_layers, info.bos_token, info.size_bytes) == (local.sliding_window_layers, "<bos>", local.size_bytes)


def test_a_server_that_ignores_range_is_read_only_as_far_as_needed(hub, starter_gguf):
    hub.faults.ignore_range.add("starter-Q4_K_M.gguf")
    ref = "hf:test-org/Starter-GGUF:Q4_K_M"
    info = hub_model(ref, parse_ref(ref), cpu_machine(8 * GIB)).info
    assert info.layer_weight_bytes == read_model_info(starter_gguf).layer_weight_bytes
    assert [s.status for s in hub.gets("starter-Q4_K_M.gguf")] == [200]


def test_a_split_gguf_on_the_hub_counts_every_parts_tensors(hub, starter_gguf):
    ref = "hf:test-org/Split-GGUF:Q4_K_M"
    info = hub_model(ref, parse_ref(ref), cpu_machine(8 * GIB)).info
    local = read_model_info(starter_gguf)
    assert info.weight_bytes == local.weight_bytes and info.parameters == local.parameters
    assert sum(info.layer_repack_bytes) == sum(local.layer_repack_bytes)


def test_a_safetensors_snapshot_is_planned_from_its_config_and_headers(hub):
    from localllm.core.hf_info import read_hf_model_info

    remote = hub_model("hf:test-org/Tiny-Llama", parse_ref("hf:test-org/Tiny-Llama"), cpu_machine(8 * GIB)).info
    local = read_hf_model_info(Path(hub.repos["test-org/Tiny-Llama"].files["config.json"].source).parent)
    assert (remote.format, remote.n_layers, remote.n_kv_heads, remote.layer_weight_bytes, remote.token_embd_bytes) == (
        "safetensors", 2, 2, local.layer_weight_bytes, local.token_embd_bytes
    )
    plan = plan_fit(remote, cpu_machine(8 * GIB))
    assert plan.backend == "native" and plan.fits
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert [s.range for s in hub.gets(name)][0] == "bytes=0-7"  # the header's length, then the header


# -- pull picks the quant ------------------------------------------------------------------


def test_the_planner_picks_the_quant_for_the_machine(hub):
    ref = parse_ref("qwen2.5:0.5b")
    cpu = hub_model("qwen2.5:0.5b", ref, cpu_machine(24 * GIB))
    assert cpu.choice.quant == "Q4_K_M" and "default" in cpu.choice.reason  # CPUs: the catalog's default
    gpu = hub_model("qwen2.5:0.5b", ref, hypothetical(probe(), HardwareWishes(vram=8 * GIB)))
    assert gpu.choice.quant == "Q8_0" and "entirely on the GPU" in gpu.choice.reason
    small = hub_model("qwen2.5:0.5b", ref, cpu_machine(350 * MIB))
    assert small.choice.quant == "Q2_K" and "below Q4_K_M" in small.choice.reason
    explicit = hub_model("qwen2.5:0.5b:Q8_0", parse_ref("qwen2.5:0.5b:Q8_0"), cpu_machine(350 * MIB))
    assert explicit.choice is None and explicit.ref.quant == "Q8_0"  # a named quant is never second-guessed
    with pytest.raises(DoesNotFit, match="no quant"):
        hub_model("qwen2.5:0.5b", ref, cpu_machine(50 * MIB))


def test_pull_without_a_quant_installs_the_planners_choice_under_the_catalog_name(hub, tmp_path):
    store = ModelStore(Paths(tmp_path / "home"))
    notices: list[str] = []
    manifest = pull_with_plan("qwen2.5:0.5b", store=store, hardware=cpu_machine(350 * MIB), notice=notices.append)
    assert manifest.name == "qwen2.5:0.5b" and manifest.file.endswith("q2_k.gguf")
    assert notices == ["qwen2.5:0.5b: Q2_K is the best quant below Q4_K_M that fits at context 8192"]
    assert store.resolve("qwen2.5:0.5b").path.name == "qwen2.5-0.5b-instruct-q2_k.gguf"
    hub.reset_log()
    again = pull_with_plan("qwen2.5:0.5b", store=store, hardware=cpu_machine(64 * GIB))  # pulled again: the installed quant stays
    assert again.file == manifest.file
    assert not [s for s in hub.served if s.method == "GET" and s.status in (200, 206)]  # up to date: nothing read


# -- the planner against a real process ---------------------------------------------------


def test_the_prediction_holds_for_a_real_llama_cpp_process(tmp_path, starter_gguf):
    """benchmarks/fit_accuracy.py's measurement, short: load the starter at 2048 tokens, one short request."""
    out = tmp_path / "rows.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fit_accuracy.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model", str(starter_gguf), "--contexts", "2048", "--native-contexts", "",
         "--fill", "short", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())
    assert row["peak_growth"] > 300 * MIB  # the process really loaded the model
    # never below what the process took; a short request touches less of the compute buffer than the
    # full-context prompt the plan is sized for (within 3.5% of that peak), hence a little more room here
    assert 0 <= row["error"] <= 0.15, row
