"""ModelInfo for a model on the hub, before downloading it: headers through HTTP Range requests.

A GGUF file starts with everything the planner needs (shape, tensor table);
its first few MiB hold the header of most models, a 262k-token vocabulary
included (~6.5 MB for Gemma 3). We read the first HEADER_FIRST_READ bytes and,
when the header runs on, the next ones, doubling up to HEADER_MAX_READ. A
split GGUF's later parts add their tensor tables. A safetensors snapshot is
read the same way: config.json whole, each weights file's 8-byte length and
JSON table through a Range read.

A server that ignores Range answers 200 with the whole file; we stop reading
once we have what we asked for.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from localllm.core.errors import BadModelFile, DownloadFailed
from localllm.core.gguf_reader import HeaderIncomplete, read_gguf_bytes
from localllm.core.modelinfo import BOS_KEY, EOS_KEY, ModelInfo, add_split_part, model_info_from_header
from localllm.store.pull import PullPlan

HEADER_FIRST_READ = 8 * 1024 * 1024
HEADER_MAX_READ = 128 * 1024 * 1024
TIMEOUT_S = 30.0


def hub_model_info(plan: PullPlan) -> ModelInfo:
    """The ModelInfo of the files a pull would fetch, read from their headers on the hub."""
    if plan.format == "safetensors":
        return _snapshot_info(plan)
    first = plan.files[0]
    info = model_info_from_header(_gguf_header(plan, first.remote_path, first.size, want_tokens=(BOS_KEY, EOS_KEY)))
    for part in plan.files[1:]:
        add_split_part(info, _gguf_header(plan, part.remote_path, part.size).tensors)
    info.size_bytes = plan.total
    return info


def _gguf_header(plan: PullPlan, path: str, size: int, want_tokens: tuple = ()):
    name = f"hf:{plan.ref.repo}/{path}"
    data = b""
    want = min(HEADER_FIRST_READ, size)
    while True:
        data += read_range(plan.ref.repo, path, plan.commit, len(data), want - len(data))
        try:
            return read_gguf_bytes(data, size, name, want_tokens=want_tokens)
        except HeaderIncomplete:
            if want >= min(size, HEADER_MAX_READ):
                raise BadModelFile(f"{name}: its GGUF header is larger than {HEADER_MAX_READ >> 20} MiB") from None
            want = min(want * 2, size, HEADER_MAX_READ)


def read_range(repo: str, path: str, commit: str, start: int, length: int) -> bytes:
    """`length` bytes of a hub file from `start` (fewer only at the end of the file)."""
    from localllm.store import download, hub

    if length <= 0:
        return b""
    url = hub.file_url(repo, path, commit)
    headers = {**hub.request_headers(), "Range": f"bytes={start}-{start + length - 1}"}
    client = hub.http_client()
    try:
        with client.stream("GET", url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True) as r:
            if r.status_code not in (200, 206):
                raise hub.status_error(r.status_code, repo, path)
            skip = start if r.status_code == 200 else 0  # Range ignored: the file from its first byte
            chunks, have = [], 0
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                have += len(chunk)
                if have >= skip + length:
                    break
            return b"".join(chunks)[skip : skip + length]
    except download.DownloadFailed:
        raise
    except Exception as exc:  # transport errors and the like, as one line
        raise hub.hub_error(exc, repo, path) from None


# -- safetensors snapshots ----------------------------------------------------------


def _snapshot_info(plan: PullPlan) -> ModelInfo:
    """Stub files in a temporary folder (config and tokenizer settings, each weights file's header) for hf_info."""
    from localllm.core.hf_info import read_hf_model_info

    repo, commit = plan.ref.repo, plan.commit
    with tempfile.TemporaryDirectory(prefix="localllm-remote-") as tmp:
        folder = Path(tmp)
        for f in plan.files:
            if f.local_name in ("config.json", "tokenizer_config.json"):
                (folder / f.local_name).write_bytes(read_range(repo, f.remote_path, commit, 0, f.size))
            elif f.local_name.endswith(".safetensors"):
                head = read_range(repo, f.remote_path, commit, 0, 8)
                if len(head) < 8:
                    raise BadModelFile(f"hf:{repo}/{f.remote_path} is not a safetensors file")
                (length,) = struct.unpack("<Q", head)
                if length > HEADER_MAX_READ:
                    raise BadModelFile(f"hf:{repo}/{f.remote_path}: a safetensors header of {length} bytes")
                (folder / f.local_name).write_bytes(head + read_range(repo, f.remote_path, commit, 8, length))
        try:
            info = read_hf_model_info(folder)
        except (ValueError, json.JSONDecodeError) as exc:
            raise DownloadFailed(f"hf:{repo}: cannot read its configuration ({exc})") from None
    info.size_bytes = plan.total
    info.path = Path(plan.ref.name)
    return info
