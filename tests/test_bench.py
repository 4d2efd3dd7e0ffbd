"""`localllm bench`: the load generator against our server in-process and against a running one by --url."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from server_harness import ROOT, make_store, start_server


def bench(home, *args: str, python_prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    code = f"{python_prelude}import sys; from localllm.cli.parser import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_bench_in_process_reports_each_level_as_json_and_a_plot(tmp_path, starter_gguf):
    make_store(tmp_path, {"starter": starter_gguf})
    png = tmp_path / "levels.png"
    done = bench(
        tmp_path, "starter", "--concurrency", "1,3", "--requests", "3", "--prompt-tokens", "8", "--max-tokens", "6",
        "--threads", "1", "--ctx", "512", "--json", "--plot", str(png),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["in_process"] and report["model"] == "starter" and report["max_tokens"] == 6
    levels = report["levels"]
    assert [level["concurrency"] for level in levels] == [1, 3]
    for level in levels:
        assert level["requests"] == 3 and level["errors"] == 0, level
        assert level["aggregate_tok_s"] > 0 and 0 < level["ttft_p50_s"] <= level["ttft_p95_s"]
        assert level["itl_p50_s"] > 0
    # the fit plan's prediction beside each measurement: one request alone, then three sharing each step
    assert report["predicted_for"] == "llama.cpp Q4_K_M"
    one, three = levels
    assert one["predicted_request_tok_s"] == one["predicted_aggregate_tok_s"] > 0
    assert three["predicted_aggregate_tok_s"] > one["predicted_aggregate_tok_s"] > three["predicted_request_tok_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prints_the_predicted_decode_speed_next_to_the_measured_one(tmp_path, starter_gguf):
    make_store(tmp_path, {"starter": starter_gguf})
    done = bench(tmp_path, "starter", "--concurrency", "1", "--requests", "2", "--prompt-tokens", "8", "--max-tokens", "8",
                 "--threads", "1", "--ctx", "512")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.strip().splitlines()[:2]
    assert header.split()[-6:] == ["total", "tok/s", "predicted", "req", "predicted", "total"]
    measured, predicted = float(row.split()[-4]), float(row.split()[-2])
    assert measured > 0 and predicted > 0
    assert "predicted by the fit plan for llama.cpp Q4_K_M:" in done.stderr


def test_bench_measures_a_running_server_by_url_and_prints_a_table(tmp_path, starter_gguf):
    make_store(tmp_path, {"starter": starter_gguf})
    server = start_server(tmp_path, "starter", "--ctx", "512", "--threads", "1", "--parallel", "2")
    try:
        done = bench(tmp_path, "--url", server.v1, "--concurrency", "2", "--requests", "2", "--prompt-tokens", "8", "--max-tokens", "5")
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.strip().splitlines()[:2]
    assert "TTFT p50" in header and "total tok/s" in header
    assert row.split()[:3] == ["2", "2", "0"]  # level, requests, errors
    assert "benchmarking starter" in done.stderr  # the model was found at /models
    assert "predicted" not in header  # another server: its engine and machine are not ours to predict


def test_bench_says_in_one_line_what_to_install_for_a_plot(tmp_path):
    done = bench(tmp_path, "--plot", str(tmp_path / "x.png"), python_prelude="import sys; sys.modules['matplotlib'] = None; ")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: --plot needs matplotlib: pip install 'localllm[bench]'"


def test_bench_refuses_bad_levels_and_a_local_backend_with_url(tmp_path):
    done = bench(tmp_path, "--concurrency", "1,0")
    assert done.returncode == 1 and "positive integers" in done.stderr
    done = bench(tmp_path, "--url", "http://127.0.0.1:9/v1", "--backend", "llamacpp")
    assert done.returncode == 1 and "--url measures that server directly" in done.stderr
