"""Corrupt and hostile GGUF headers: one short BadModelFile line, in bounded time and memory.

The fuzz mutates and truncates copies of the real starter's header (its 6.5 MB
header, tensor data left sparse); the targeted cases go through the real
`localllm show` as a subprocess, whose wall time and peak RSS are measured.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localllm.core.errors import BadModelFile
from localllm.core.gguf_reader import read_gguf
from localllm.core.modelinfo import read_model_info

SHOW_SECONDS = 2.0
SHOW_RSS_BYTES = 200 * 2**20
# A u64 or u32 a corrupted count or length may hold.
INTERESTING = [0, 1, 2, 63, 64, 65, 1024, 1025, 50_000_000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


class Header:
    """The starter's header bytes, its real file size and where its regions are."""

    def __init__(self, starter: Path) -> None:
        gguf = read_gguf(starter)
        with open(starter, "rb") as f:
            self.data = f.read(gguf.data_offset)
        self.file_size = gguf.file_size
        first = gguf.tensors[0].name.encode()
        self.tensor_infos = self.data.index(struct.pack("<Q", len(first)) + first)
        self.vocabulary = gguf.metadata["tokenizer.ggml.tokens"].offset - 12  # its type and length
        self.block_count = _value_offset(self.data, "gemma3.block_count")
        self.name_length = _value_offset(self.data, "general.name")


def _value_offset(data: bytes, key: str) -> int:
    """Where the value of `key` starts (after its u32 type)."""
    at = data.index(struct.pack("<Q", len(key)) + key.encode())
    return at + 8 + len(key) + 4


@pytest.fixture(scope="module")
def header(starter_gguf: Path) -> Header:
    return Header(starter_gguf)


def _write(path: Path, data: bytes, size: int | None) -> Path:
    """`data`, then a sparse extension to `size` (the tensor data, never read by a header reader)."""
    with open(path, "wb") as f:
        f.write(data)
        if size is not None and size > len(data):
            f.truncate(size)
    return path


def _read_within_bounds(path: Path) -> BadModelFile | None:
    """read_model_info, which may succeed or raise BadModelFile, within time and traced memory."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        read_model_info(path)
        error = None
    except BadModelFile as e:
        error = e
    finally:
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < SHOW_SECONDS, f"{elapsed:.2f} s"
    assert peak < SHOW_RSS_BYTES // 2, f"{peak / 2**20:.0f} MiB"
    if error is not None:
        message = str(error)
        assert "\n" not in message and len(message) < len(str(path)) + 300, message[:500]
    return error


# --- fuzz: mutated and truncated copies of the real header -------------------------


@st.composite
def mutations(draw: st.DrawFn, regions: tuple[int, int, int]) -> list[tuple[int, bytes]]:
    """A few writes, mostly into the key/values before the vocabulary and into the tensor table."""
    vocabulary, tensor_infos, end = regions
    region = st.sampled_from([(0, vocabulary + 16), (0, vocabulary + 16), (tensor_infos, end), (vocabulary, end)])
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        lo, hi = draw(region)
        at = draw(st.integers(lo, hi - 8))
        kind = draw(st.sampled_from(["bit", "u64", "u32", "bytes"]))
        if kind == "bit":
            edits.append((at, bytes([1 << draw(st.integers(0, 7))])))  # xor'ed in
        elif kind == "u64":
            edits.append((at, struct.pack("<Q", draw(st.sampled_from(INTERESTING)))))
        elif kind == "u32":
            edits.append((at, struct.pack("<I", draw(st.sampled_from(INTERESTING)) & 0xFFFFFFFF)))
        else:
            edits.append((at, draw(st.binary(min_size=1, max_size=8))))
    return edits


FUZZ = settings(
    max_examples=int(os.environ.get("GGUF_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.data())
def test_fuzzed_headers_only_ever_raise_bad_model_file(header: Header, data: st.DataObject) -> None:
    edits = data.draw(mutations((header.vocabulary, header.tensor_infos, len(header.data))))
    mutated = bytearray(header.data)
    for at, payload in edits:
        if len(payload) == 1 and payload[0] & (payload[0] - 1) == 0:
            mutated[at] ^= payload[0]
        else:
            mutated[at : at + len(payload)] = payload
    with tempfile.TemporaryDirectory() as where:
        _read_within_bounds(_write(Path(where) / "fuzzed.gguf", bytes(mutated), header.file_size))


@FUZZ
@given(data=st.data())
def test_truncated_headers_only_ever_raise_bad_model_file(header: Header, data: st.DataObject) -> None:
    cut = data.draw(st.one_of(st.integers(0, header.vocabulary + 64), st.integers(header.tensor_infos, len(header.data) - 32)))  # not into the zero padding
    sparse = data.draw(st.booleans())  # a cut-short download, or a header cut inside a whole-size file
    with tempfile.TemporaryDirectory() as where:
        path = _write(Path(where) / "cut.gguf", header.data[:cut], header.file_size if sparse else None)
        assert _read_within_bounds(path) is not None


# --- targeted cases through the real CLI ------------------------------------------


# `python -m localllm` that writes its own peak RSS (VmHWM, in kB) to the file named first on exit. A
# child's ru_maxrss from wait4 is no measure here: Linux carries the parent's high-water mark into a
# vforked child, so it reports the test runner's size (a gigabyte in the full suite).
PEAK_RSS_WRAPPER = """
import atexit, runpy, sys
report = sys.argv.pop(1)

def write_peak():
    with open("/proc/self/status") as status:
        kilobytes = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(report, "w") as out:
        out.write(kilobytes)

atexit.register(write_peak)
sys.argv[0] = "localllm"
runpy.run_module("localllm", run_name="__main__", alter_sys=True)
"""


def _show(path: Path, home: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """`localllm show PATH` as a user runs it; its wall time and its own peak RSS in bytes."""
    report = home.parent / "peak-rss-kb"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, str(report), "show", str(path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env={**os.environ, "LOCALLLM_HOME": str(home)},
    )
    elapsed = time.monotonic() - started
    return result, elapsed, int(report.read_text()) * 1024


def _nested_arrays(depth: int) -> bytes:
    key = b"deep"
    value = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)  # arrays of arrays... of u32
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + value


def _patched(header: Header, at: int, payload: bytes) -> bytes:
    return header.data[:at] + payload + header.data[at + len(payload) :]


CASES = {
    "block_count 50,000,000": lambda h: _patched(h, h.block_count, struct.pack("<I", 50_000_000)),
    "block_count 0xFFFFFFFF": lambda h: _patched(h, h.block_count, struct.pack("<I", 0xFFFFFFFF)),
    "arrays nested 5,000 deep": lambda h: _nested_arrays(5000),
    "huge string length": lambda h: _patched(h, h.name_length, struct.pack("<Q", 2**63 + 5)),
    "a string 67 MB long inside the file": lambda h: _patched(h, h.name_length, struct.pack("<Q", 67_000_000)),
    "huge array length": lambda h: _patched(h, h.vocabulary + 4, struct.pack("<Q", 2**62)),
    "huge tensor count": lambda h: _patched(h, 8, struct.pack("<Q", 2**64 - 1)),
    # same length as the name it replaces, so the rest of the table stays in place
    "tensor in layer 4,000,000,000": lambda h: h.data.replace(b"blk.0.attn_k.weight", b"blk.4000000000.attn", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_show_refuses_hostile_headers_in_bounded_time_and_memory(case: str, header: Header, tmp_path: Path) -> None:
    data = CASES[case](header)
    path = _write(tmp_path / "hostile.gguf", data, header.file_size)
    result, elapsed, rss = _show(path, tmp_path / "home")
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr[:1000]
    assert "unexpected" not in lines[0] and len(lines[0]) < len(str(path)) + 300, lines[0][:500]
    assert elapsed < SHOW_SECONDS, f"{case}: {elapsed:.2f} s"
    assert rss < SHOW_RSS_BYTES, f"{case}: {rss / 2**20:.0f} MiB"
