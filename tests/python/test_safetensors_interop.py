"""Interop of qlora's C++ safetensors reader/writer with the reference library.

Drives the C++ helper tests/tools/safetensors_tool.cpp, found through
$QLORA_SAFETENSORS_TOOL or else $QLORA_BUILD_DIR/tests/safetensors_tool:
`copy IN OUT` reads with our reader and writes with our writer, `check IN`
validates a file. Run with pytest or `python THIS_FILE`.
"""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Every dtype safetensors.torch can load, with a readable name for test ids.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (3, 5), (2, 3, 5)]


@pytest.fixture(scope="module")
def tool():
    path = os.environ.get("QLORA_SAFETENSORS_TOOL")
    if not path and os.environ.get("QLORA_BUILD_DIR"):
        path = os.path.join(os.environ["QLORA_BUILD_DIR"], "tests", "safetensors_tool")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"safetensors_tool not found ({path!r}): set QLORA_SAFETENSORS_TOOL to the built "
            "executable, or QLORA_BUILD_DIR to the build directory holding tests/safetensors_tool"
        )
    return path


def random_tensor(shape, dtype, generator):
    """Uniformly random bytes: covers NaNs, infinities and every bit pattern."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def every_dtype_tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name.lower()}.{'x'.join(map(str, shape)) or 'scalar'}": random_tensor(
            shape, dtype, generator
        )
        for name, dtype in DTYPES.items()
        for shape in SHAPES
    }


def as_bytes(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(actual, expected):
    """torch.equal, but exact for NaN payloads and for dtypes without eq kernels."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(as_bytes(got), as_bytes(want)), name


def run_tool(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def copy_with_tool(tool, src, dst):
    result = run_tool(tool, "copy", str(src), str(dst))
    assert result.returncode == 0, result.stderr


def test_copy_roundtrips_every_dtype_and_metadata(tool, tmp_path):
    tensors = every_dtype_tensors()
    metadata = {"format": "pt", "note": 'ünï "quoted"\n\ttabbed', "": "empty key"}
    save_file(tensors, tmp_path / "in.safetensors", metadata=metadata)

    copy_with_tool(tool, tmp_path / "in.safetensors", tmp_path / "out.safetensors")

    assert_bitwise_equal(load_file(tmp_path / "out.safetensors"), tensors)
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert f.metadata() == metadata


@pytest.mark.parametrize(
    "metadata", [None, {"format": "pt"}], ids=["no-metadata", "one-metadata-entry"]
)
def test_written_bytes_match_python(tool, tmp_path, metadata):
    # Python writes metadata in hash order, so only <= 1 entry is deterministic.
    tensors = every_dtype_tensors(seed=1)
    save_file(tensors, tmp_path / "python.safetensors", metadata=metadata)

    copy_with_tool(tool, tmp_path / "python.safetensors", tmp_path / "ours.safetensors")

    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "python.safetensors").read_bytes()


def test_empty_file_matches_python(tool, tmp_path):
    save_file({}, tmp_path / "python.safetensors")
    copy_with_tool(tool, tmp_path / "python.safetensors", tmp_path / "ours.safetensors")
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "python.safetensors").read_bytes()


def test_check_lists_tensors_in_file_order(tool, tmp_path):
    save_file(
        {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float64), "s": torch.tensor(1)},
        tmp_path / "t.safetensors",
    )
    result = run_tool(tool, "check", str(tmp_path / "t.safetensors"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["s I64 []", "b F64 [3]", "w F32 [2, 3]"]


def header_file(header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32_entry(begin, end, shape=(1,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


MALFORMED = {
    "truncated": (b"\x10\x00\x00", "shorter than the 8-byte header length prefix"),
    "header-length-huge": (header_file({}, length=1 << 62), "exceeds the limit"),
    "header-length-past-eof": (header_file({}, length=4096), "truncated file?"),
    "invalid-json": (header_file(b'{"a": {'), "is not valid JSON"),
    "nul-padding": (header_file(b"{}\0\0\0\0\0\0"), "NUL byte at offset 2"),
    "header-not-object": (header_file([]), "header must be a JSON object"),
    "missing-dtype": (
        header_file({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        'missing "dtype"',
    ),
    "bad-dtype": (
        header_file({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        'unknown dtype "F33"',
    ),
    "negative-dim": (
        header_file({"a": f32_entry(0, 4, shape=(-1,))}, bytes(4)),
        "negative dimension",
    ),
    "offsets-out-of-bounds": (
        header_file({"a": f32_entry(0, 4)}, bytes(2)),
        "beyond the data section",
    ),
    "offsets-reversed": (header_file({"a": f32_entry(4, 0)}, bytes(4)), "begin > end"),
    "overlap": (
        header_file({"a": f32_entry(0, 8, (2,)), "b": f32_entry(4, 8)}, bytes(8)),
        "overlap",
    ),
    "gap": (
        header_file({"a": f32_entry(0, 4), "b": f32_entry(8, 12)}, bytes(12)),
        "gap of 4 bytes",
    ),
    "byte-length-mismatch": (header_file({"a": f32_entry(0, 8)}, bytes(8)), "needs 4 bytes"),
    "trailing-bytes": (header_file({"a": f32_entry(0, 4)}, bytes(8)), "trailing bytes"),
    "metadata-not-strings": (
        header_file({"__metadata__": {"k": 1}, "a": f32_entry(0, 4)}, bytes(4)),
        "must be a string",
    ),
}


@pytest.mark.parametrize("case", MALFORMED.keys())
def test_check_rejects_malformed_file(tool, tmp_path, case):
    contents, expected_message = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(contents)

    result = run_tool(tool, "check", str(path))

    assert result.returncode == 1, (result.returncode, result.stderr)
    assert expected_message in result.stderr
    assert str(path) in result.stderr
    assert result.stdout == ""
    # Our reader is never more permissive than the reference one.
    with pytest.raises(Exception):
        load_file(path)


if __name__ == "__main__":
    # No cache provider: a run from the build must not write into the source tree.
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
