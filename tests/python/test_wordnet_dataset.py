"""tools/make_wordnet_dataset.py: exact records from a small hand-written WordNet, and the
default generation from the real database (Debian's wordnet-base): deterministic, split by
word, well-formed, every output naming its word."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_wordnet_dataset.py"
WORDNET = pathlib.Path("/usr/share/wordnet")
KINDS = ("Define the word", "Use the word", "What part of speech is the word")


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def word_of(record):
    return re.search(r'"([^"]+)"', record["instruction"]).group(1)


def words_of(records):
    return {word_of(r) for r in records}


# ---------------------------------------------------------------------------------------------
# A miniature WordNet in the wndb(5WN) format
# ---------------------------------------------------------------------------------------------

HEADER = "  1 This software and database is being provided to you, the LICENSEE...  \n"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
SENSE_DIGIT = {"n": 1, "v": 2, "a": 3, "r": 4}


def synset_line(offset, pos, words, gloss, pointers=()):
    ptrs = "".join(f" {sym} {off} {ppos} 0000" for sym, off, ppos in pointers)
    frames = " 01 + 02 00" if pos == "v" else ""  # verbs list sentence frames after pointers
    entries = " ".join(f"{w} 0" for w in words)
    return (f"{offset} 05 {pos} {len(words):02x} {entries} {len(pointers):03d}{ptrs}{frames} "
            f"| {gloss}  \n")


def fake_wordnet(root, fillers=40):
    """(pos, offset, words, gloss, pointers, lemma counts) for every synset."""
    synsets = [
        ("n", "00000100", ["dog"], 'a domesticated canine; "the dog barked all night"', ()),
        ("n", "00000200", ["Bush"], 'a president; "Bush was elected in the year 2000"', ()),
        ("n", "00000300", ["ethnic_slur"], "a slur on someone's race", ()),
        ("n", "00000400", ["slurword"], 'a bad word; "never say slurword to anyone ever"',
         ((";u", "00000300", "n"),)),
        ("n", "00000500", ["shortex"], 'a short thing; "a shortex"', ()),
        ("n", "00000600", ["rareword"], 'an uncommon thing; "the rareword appeared only once"', ()),
        ("n", "00000700", ["run"], 'a score in baseball; "he hit a home run today"', ()),
        ("v", "00000100", ["dog"], 'go after with intent to catch; "the police dogged the suspect"',
         ()),
        ("v", "00000200", ["run"], 'move fast on foot; "she runs every morning before work"', ()),
        ("a", "00000100", ["happy(a)"], 'enjoying well-being; "a happy smile on her face"', ()),
        ("r", "00000100", ["swiftly"], 'with speed; "she answered the letter swiftly"', ()),
    ]
    counts = {("dog", "n"): 10, ("dog", "v"): 2, ("bush", "n"): 5, ("slurword", "n"): 5,
              ("shortex", "n"): 5, ("run", "n"): 3, ("run", "v"): 20, ("happy", "a"): 7,
              ("swiftly", "r"): 4}
    for i in range(fillers):
        word = "fill" + chr(ord("a") + i // 26) + chr(ord("a") + i % 26)
        synsets.append(("n", f"{1000 + i:08d}", [word],
                        f'filler thing number {i}; "we saw a {word} in the garden"', ()))
        counts[(word, "n")] = i + 1
    index = {}
    for pos in POS_FILES:
        lines = [synset_line(off, pos, words, gloss, ptrs)
                 for p, off, words, gloss, ptrs in synsets if p == pos]
        (root / f"data.{POS_FILES[pos]}").write_text(HEADER + "".join(lines), encoding="ascii")
    for p, off, words, _, _ in synsets:
        for w in words:
            index.setdefault((re.sub(r"\(.*\)", "", w).lower(), p), []).append(off)
    for pos in POS_FILES:
        lines = sorted(f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 {' '.join(offs)}  \n"
                       for (lemma, p), offs in index.items() if p == pos)
        (root / f"index.{POS_FILES[pos]}").write_text(HEADER + "".join(lines), encoding="ascii")
    (root / "cntlist.rev").write_text(
        "".join(f"{lemma}%{SENSE_DIGIT[pos]}:05:00:: 1 {n}\n"
                for (lemma, pos), n in sorted(counts.items())), encoding="ascii")
    return root


@pytest.fixture()
def mini(tmp_path):
    root = tmp_path / "wordnet"
    root.mkdir()
    return fake_wordnet(root)


def test_mini_wordnet_records_are_exact(mini, tmp_path):
    out = tmp_path / "out"
    r = run_tool("--wordnet-dir", mini, "--out", out, "--words", 1000, "--eval-fraction", 0,
                 "--min-count", 1)
    assert r.returncode == 0, r.stderr
    assert "only 44 words qualify" in r.stderr
    train = read_jsonl(out / "train.jsonl")
    assert read_jsonl(out / "eval.jsonl") == []
    # Proper nouns, blocked usage domains, short examples, rare words and phrases are left out.
    expected_words = {"dog", "run", "happy", "swiftly"} | {w for w in words_of(train)
                                                          if w.startswith("fill")}
    assert words_of(train) == expected_words and len(expected_words) == 44
    by_word = {}
    for rec in train:
        by_word.setdefault(word_of(rec), []).append(rec)
    assert by_word["dog"] == [
        {"instruction": 'Define the word "dog".', "input": "",
         "output": "dog (noun): a domesticated canine."},
        {"instruction": 'Use the word "dog" in a sentence.', "input": "",
         "output": "The dog barked all night."},
        {"instruction": 'What part of speech is the word "dog"?', "input": "",
         "output": '"dog" is most often used as a noun; it can also be a verb.'},
    ]
    # SemCor counts rank the verb first; its sense gives the definition and the example.
    assert [r["output"] for r in by_word["run"]] == [
        "run (verb): move fast on foot.",
        "She runs every morning before work.",
        '"run" is most often used as a verb; it can also be a noun.',
    ]
    assert [r["output"] for r in by_word["happy"]] == [
        "happy (adjective): enjoying well-being.",
        "A happy smile on her face.",
        '"happy" is an adjective.',
    ]
    assert by_word["swiftly"][2]["output"] == '"swiftly" is an adverb.'


def test_mini_wordnet_min_count_and_seed(mini, tmp_path):
    r = run_tool("--wordnet-dir", mini, "--out", tmp_path / "a", "--min-count", 30,
                 "--words", 5, "--eval-fraction", 0)
    assert r.returncode == 0, r.stderr
    # Only fillers 29..39 (counts 30..40) are common enough.
    words = words_of(read_jsonl(tmp_path / "a" / "train.jsonl"))
    assert len(words) == 5 and all(w.startswith("fill") for w in words)

    def generate(seed, name):
        d = tmp_path / name
        r = run_tool("--wordnet-dir", mini, "--out", d, "--words", 20, "--eval-fraction", 0.25,
                     "--seed", seed, "--min-count", 1)
        assert r.returncode == 0, r.stderr
        train, held = read_jsonl(d / "train.jsonl"), read_jsonl(d / "eval.jsonl")
        assert len(words_of(train)) == 15 and len(words_of(held)) == 5
        assert not words_of(train) & words_of(held)
        return (d / "train.jsonl").read_bytes() + (d / "eval.jsonl").read_bytes()

    assert generate(1, "a1") == generate(1, "b1")
    assert generate(1, "c1") != generate(2, "c2")


def test_rewrites_atomically(mini, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("stale\n")
    for _ in range(2):
        r = run_tool("--wordnet-dir", mini, "--out", out, "--words", 10, "--min-count", 1)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["eval.jsonl", "train.jsonl"]  # no temporary left over
    assert (out / "train.jsonl").read_text().startswith('{"instruction": ')
    assert (out / "train.jsonl").stat().st_mode & 0o777 == 0o644


def test_missing_wordnet_is_a_clear_error(tmp_path):
    r = run_tool("--wordnet-dir", tmp_path, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert "lacks data.noun" in r.stderr and "wordnet-base" in r.stderr
    assert not (tmp_path / "out").exists()
    assert run_tool("--out", tmp_path / "o", "--eval-fraction", 2).returncode == 2


# ---------------------------------------------------------------------------------------------
# The default dataset, from the real WordNet
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    if not (WORDNET / "data.noun").exists():
        pytest.skip("WordNet is not installed (Debian package wordnet-base)")
    runs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name)
        r = run_tool("--out", out)
        assert r.returncode == 0, r.stderr
        runs.append((out, r.stdout))
    return runs


def test_default_generation_is_deterministic(default_runs):
    (a, stats_a), (b, stats_b) = default_runs
    for name in ("train.jsonl", "eval.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert stats_a.replace(str(a), "") == stats_b.replace(str(b), "")
    assert re.match(r"wordnet dataset: 3000 words \(2850 train, 150 eval\) of \d+ candidates, "
                    r"9000 records \(8550 train, 450 eval\), seed 0", stats_a), stats_a


def test_default_split_is_by_word(default_runs):
    out = default_runs[0][0]
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(train) == 8550 and len(held) == 450
    assert not words_of(train) & words_of(held)
    assert len(words_of(train)) == 2850 and len(words_of(held)) == 150


def test_default_records_are_well_formed_and_name_their_word(default_runs):
    out = default_runs[0][0]
    for name in ("train.jsonl", "eval.jsonl"):
        records = read_jsonl(out / name)
        kinds = {}
        for rec in records:
            assert list(rec) == ["instruction", "input", "output"], rec
            assert all(isinstance(v, str) for v in rec.values()), rec
            assert rec["input"] == "" and rec["instruction"].strip() and rec["output"].strip()
            word = word_of(rec)
            assert re.fullmatch(r"[a-z]{3,}", word), rec
            kind = next(k for k in KINDS if rec["instruction"].startswith(k))
            kinds.setdefault(word, []).append(kind)
            assert re.search(r"\b" + word, rec["output"], re.I), rec
            assert rec["output"][-1] in ".!?", rec
            if kind == "Use the word":
                assert rec["output"][0].isupper() and len(rec["output"].split()) >= 4, rec
        assert all(v == list(KINDS) for v in kinds.values())
