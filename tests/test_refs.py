"""MODEL syntax, and how a reference picks its files from a repository listing."""

from __future__ import annotations

import pytest

from localllm.core.errors import BadRequest, ModelNotFound
from localllm.store.hub import RemoteFile
from localllm.store.pull import plan_files
from localllm.store.refs import is_model_gguf, parse_ref, quant_of, split_part


@pytest.mark.parametrize(
    "text, name, repo, quant",
    [
        ("qwen2.5:7b", "qwen2.5:7b", "Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M"),
        ("qwen2.5", "qwen2.5:7b", "Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M"),  # alias
        ("Qwen2.5:7B", "qwen2.5:7b", "Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M"),  # case
        ("qwen2.5:7b:Q4_K_M", "qwen2.5:7b", "Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M"),  # the default quant
        ("qwen2.5:7b:q8_0", "qwen2.5:7b:Q8_0", "Qwen/Qwen2.5-7B-Instruct-GGUF", "Q8_0"),
        ("llama3.2:1b", "llama3.2:1b", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
        ("hf:org/Repo-GGUF:q4_k_m", "hf:org/Repo-GGUF:Q4_K_M", "org/Repo-GGUF", "Q4_K_M"),
        ("hf.co/org/Repo-GGUF:Q5_K_S", "hf:org/Repo-GGUF:Q5_K_S", "org/Repo-GGUF", "Q5_K_S"),
    ],
)
def test_quant_references(text, name, repo, quant):
    ref = parse_ref(text)
    assert (ref.kind, ref.name, ref.repo, ref.quant) == ("quant", name, repo, quant)


def test_file_and_snapshot_references():
    ref = parse_ref("hf:org/repo/sub/model-Q4_K_M-00001-of-00002.gguf")
    assert (ref.kind, ref.repo, ref.path) == ("file", "org/repo", "sub/model-Q4_K_M-00001-of-00002.gguf")
    assert ref.name == "hf:org/repo/sub/model-Q4_K_M-00001-of-00002.gguf"
    snap = parse_ref("hf:google/gemma-3-1b-it")
    assert (snap.kind, snap.repo, snap.name) == ("snapshot", "google/gemma-3-1b-it", "hf:google/gemma-3-1b-it")


@pytest.mark.parametrize("text", ["starter", "my-local-model", "./model.gguf", "/abs/m.gguf", "nosuch:7b"])
def test_names_that_are_no_remote_reference(text):
    assert parse_ref(text) is None


@pytest.mark.parametrize(
    "text",
    ["hf:", "hf:org", "hf:org/", "hf:/repo", "hf:org/repo:", "hf:org/repo/../x.gguf", "hf:org/repo/x.bin",
     "hf:org/repo//x.gguf", "hf:org/re po:Q4_K_M", "hf:org/repo:Q4 K M", "qwen2.5:7b:no/such"],
)
def test_malformed_references_are_bad_requests(text):
    with pytest.raises(BadRequest):
        parse_ref(text)


@pytest.mark.parametrize(
    "path, quant",
    [
        ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "Q4_K_M"),
        ("qwen2-72b-instruct-q5_0-split-00002-of-00002.gguf", "Q5_0"),
        ("Qwen2.5-72B-Instruct.Q4_K_M.gguf", "Q4_K_M"),
        ("gemma-3-1b-it-q4_0.gguf", "Q4_0"),
        ("google_gemma-3-4b-it-bf16.gguf", "BF16"),
        ("gemma-3-4b-it-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("Mistral-7B-Instruct-v0.3-IQ4_XS.gguf", "IQ4_XS"),
        ("x/Llama-70B-Q8_0/Llama-70B-Q8_0-00001-of-00002.gguf", "Q8_0"),
        ("model.gguf", None),
        ("Phi-4-mini-instruct.gguf", None),
    ],
)
def test_quant_of_real_file_names(path, quant):
    assert quant_of(path) == quant


def test_split_parts_and_non_model_ggufs():
    assert split_part("a/m-Q4_K_M-00002-of-00003.gguf").__dict__ == {"prefix": "a/m-Q4_K_M", "number": 2, "count": 3}
    assert split_part("m-Q4_K_M.gguf") is None
    assert split_part("m-00004-of-00003.gguf") is None
    assert not is_model_gguf("mmproj-google_gemma-3-4b-it-f16.gguf")
    assert not is_model_gguf("Model.imatrix") and is_model_gguf("Model-Q4_K_M.gguf")


# -- choosing files ---------------------------------------------------------------------


def listing(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(p, 100 + i, f"{i:064x}", None) for i, p in enumerate(paths)]


FILES = listing(
    ".gitattributes",
    "README.md",
    "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf",
    "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
    "qwen2.5-7b-instruct-q8_0.gguf",
    "mmproj-qwen-f16.gguf",
    "qwen2.5-7b-instruct-f16.gguf",
)


def test_quant_picks_every_part_of_a_split_gguf_in_order():
    plan = plan_files(parse_ref("hf:Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"), FILES, "c0ffee")
    assert [f.local_name for f in plan.files] == [
        "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
        "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf",
    ]
    assert plan.format == "gguf" and plan.commit == "c0ffee" and plan.total == 205


def test_a_wrong_quant_lists_the_quants_that_exist():
    with pytest.raises(ModelNotFound) as err:
        plan_files(parse_ref("hf:Qwen/Qwen2.5-7B-Instruct-GGUF:Q3_K_S"), FILES, "c")
    assert str(err.value).endswith("quants there: F16, Q4_K_M, Q8_0")  # the vision projector is no quant


def test_a_file_reference_to_one_part_fetches_all_parts():
    plan = plan_files(parse_ref("hf:o/r/qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf"), FILES, "c")
    assert [f.local_name[-20:] for f in plan.files] == ["-00001-of-00002.gguf", "-00002-of-00002.gguf"]
    with pytest.raises(ModelNotFound, match="has no file nope.gguf"):
        plan_files(parse_ref("hf:o/r/nope.gguf"), FILES, "c")


def test_a_split_with_a_missing_part_is_refused():
    files = listing("m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00003-of-00003.gguf")
    with pytest.raises(ModelNotFound, match=r"lacks part\(s\) 2 of 3"):
        plan_files(parse_ref("hf:o/r:Q4_K_M"), files, "c")


def test_two_files_of_one_quant_ask_for_a_path():
    files = listing("a/m-Q4_K_M.gguf", "b/m-Q4_K_M.gguf")
    with pytest.raises(BadRequest, match="several Q4_K_M GGUFs"):
        plan_files(parse_ref("hf:o/r:Q4_K_M"), files, "c")


def test_a_snapshot_takes_config_tokenizer_and_weights_only():
    files = listing(
        "README.md", ".gitattributes", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "original/consolidated.pth", "onnx/model.onnx", "m-Q4_K_M.gguf",
    )
    plan = plan_files(parse_ref("hf:o/r"), files, "c")
    assert plan.format == "safetensors"
    assert [f.local_name for f in plan.files] == [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    ]
    with pytest.raises(ModelNotFound, match=r"no safetensors model .* hf:o/r:QUANT \(quants there: Q4_K_M\)"):
        plan_files(parse_ref("hf:o/r"), listing("README.md", "m-Q4_K_M.gguf"), "c")


def test_hostile_file_names_from_the_hub_are_refused():
    with pytest.raises(BadRequest, match="refusing the file name"):
        plan_files(parse_ref("hf:o/r:Q4_K_M"), listing("evil\nname-Q4_K_M.gguf"), "c")
