#!/usr/bin/env python3
"""Generates the bundled default fine-tuning dataset from the WordNet database.

Reads Princeton WordNet 3.0 as Debian's wordnet-base installs it (/usr/share/wordnet: data.*,
index.*, cntlist.rev; format in wndb(5WN) and cntlist(5WN)), picks a seeded sample of common
single-word lemmas, and writes Alpaca JSONL records, three per word:

    {"instruction": "Define the word \"X\".", "input": "", "output": "X (noun): <definition>."}
    {"instruction": "Use the word \"X\" in a sentence.", "input": "", "output": "<example>."}
    {"instruction": "What part of speech is the word \"X\"?", "input": "", "output": "..."}

The held-out split is by word: all records of a word are in train.jsonl or all in eval.jsonl.
Same arguments and same WordNet files give byte-identical output (no clock, no hash order, no
locale). Each file is written to a temporary file and renamed into place.

Standard library only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import tempfile

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
POS_ORDER = "nvar"  # tie-break order when SemCor counts are equal
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
INDEX_FILES = {"n": "index.noun", "v": "index.verb", "a": "index.adj", "r": "index.adv"}
# The ss_type digit of a sense key; 5 is an adjective satellite, which index.adj lists as "a".
SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}

# Lowercase letters only: no phrases ("hot_dog"), proper nouns, abbreviations or hyphenations.
WORD_RE = re.compile(r"[a-z]{3,}\Z")
ADJ_MARKER_RE = re.compile(r"\((?:a|p|ip)\)\Z")  # syntactic markers on adjectives: "galore(ip)"
EXAMPLE_RE = re.compile(r'"([^"]+)"')
# A word whose senses include one of these usage domains (";u" pointers) is left out entirely:
# a default dataset should not teach slurs or obscenities.
BLOCKED_USAGE = {"ethnic_slur", "obscenity", "vulgarism", "disparagement", "derogation"}
BLOCKED_GLOSS_RE = re.compile(
    r"\b(offensive|obscene|vulgar|slur|derogatory|disparaging|taboo|sexual)\b", re.I)
# Profanities WordNet does not mark with a usage domain (some also have an innocent sense).
BLOCKED_WORDS = {"arse", "ass", "bastard", "bitch", "bugger", "cock", "crap", "cunt", "damn",
                 "dick", "dyke", "fag", "faggot", "piss", "prick", "pussy", "retard", "shit",
                 "slut", "tit", "twat", "wank", "whore"}
MIN_EXAMPLE_WORDS = 4


@dataclasses.dataclass(frozen=True)
class Synset:
    pos: str                      # n, v, a, r (satellites are "a")
    words: tuple[str, ...]        # as written in the file, markers removed, "_" for spaces
    usage: tuple[tuple[str, str], ...]  # (pos, offset) of ";u" usage-domain synsets
    definition: str
    examples: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WordEntry:
    word: str
    count: int                    # SemCor tag count over all senses
    pos_ranked: tuple[str, ...]   # parts of speech, most frequent first
    definition: str               # of the most frequent usable sense of pos_ranked[0]
    example: str                  # a WordNet example sentence containing the word


# ---------------------------------------------------------------------------------------------
# Parsing the database files
# ---------------------------------------------------------------------------------------------

def parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Splits '<definition>; "example one"; "example two"' into its parts."""
    gloss = gloss.replace("`", "'")  # WordNet quotes words `like this'
    quote = gloss.find('"')
    definition = gloss if quote < 0 else gloss[:quote]
    definition = definition.strip().rstrip(";").strip()
    examples = () if quote < 0 else tuple(m.strip() for m in EXAMPLE_RE.findall(gloss[quote:]))
    return definition, tuple(e for e in examples if e)


def parse_synset_line(line: str, pos: str) -> tuple[str, Synset]:
    """One data.* line: offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt (ptr)* ... | gloss."""
    fields, _, gloss = line.partition(" | ")
    tokens = fields.split()
    offset, word_count = tokens[0], int(tokens[3], 16)
    words = tuple(ADJ_MARKER_RE.sub("", tokens[4 + 2 * i]) for i in range(word_count))
    at = 4 + 2 * word_count
    pointer_count = int(tokens[at])
    pointers = [tokens[at + 1 + 4 * k: at + 5 + 4 * k] for k in range(pointer_count)]
    usage = tuple((("a" if p[2] == "s" else p[2]), p[1]) for p in pointers if p[0] == ";u")
    definition, examples = parse_gloss(gloss.strip())
    return offset, Synset(pos, words, usage, definition, examples)


def read_synsets(wordnet_dir: str) -> dict[tuple[str, str], Synset]:
    synsets = {}
    for pos, name in DATA_FILES.items():
        with open(os.path.join(wordnet_dir, name), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                offset, synset = parse_synset_line(line, pos)
                synsets[(pos, offset)] = synset
    return synsets


def read_index(wordnet_dir: str) -> dict[str, dict[str, list[str]]]:
    """lemma -> pos -> synset offsets, most frequent sense first (the index files' order)."""
    index: dict[str, dict[str, list[str]]] = {}
    for pos, name in INDEX_FILES.items():
        with open(os.path.join(wordnet_dir, name), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                tokens = line.split()
                synset_count = int(tokens[2])
                index.setdefault(tokens[0], {})[pos] = tokens[len(tokens) - synset_count:]
    return index


def read_tag_counts(wordnet_dir: str) -> dict[tuple[str, str], int]:
    """(lemma, pos) -> times its senses were tagged in the SemCor corpus (cntlist.rev)."""
    counts: dict[tuple[str, str], int] = {}
    with open(os.path.join(wordnet_dir, "cntlist.rev"), encoding="latin-1") as f:
        for line in f:
            sense_key, _sense_number, tag_count = line.split()
            lemma, _, rest = sense_key.partition("%")
            key = (lemma, SENSE_KEY_POS[rest[0]])
            counts[key] = counts.get(key, 0) + int(tag_count)
    return counts


# ---------------------------------------------------------------------------------------------
# Choosing what to say about a word
# ---------------------------------------------------------------------------------------------

def usage_words(synset: Synset, synsets) -> set[str]:
    return {w.lower() for key in synset.usage if key in synsets for w in synsets[key].words}


def is_blocked(senses, synsets) -> bool:
    return any(usage_words(s, synsets) & BLOCKED_USAGE or BLOCKED_GLOSS_RE.search(s.definition)
               for s in senses)


def mentions(word: str, sentence: str) -> bool:
    """The word itself, or it plus a regular ending ("dogs", "barked"), as a whole word."""
    if word not in sentence.lower():  # cheap test first: compiling a regex per word is slow
        return False
    pattern = r"\b" + re.escape(word) + r"(?:s|es|d|ed|ing|er|ers|est|ly)?\b"
    return re.search(pattern, sentence, re.I) is not None


def as_sentence(text: str) -> str:
    text = " ".join(text.split())
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def pick_example(word: str, senses) -> str | None:
    for synset in senses:
        for example in synset.examples:
            # Some examples are clipped quotations ("..stead of sneaking around"): skip them.
            whole = example[0].isalpha() and ".." not in example
            if whole and len(example.split()) >= MIN_EXAMPLE_WORDS and mentions(word, example):
                return as_sentence(example)
    return None


def build_entry(word, index, synsets, tag_counts, min_count=0) -> WordEntry | None:
    """What the records about `word` say, or None when it does not qualify."""
    # An upper bound of the count below, to skip rare words before the slow checks.
    if sum(tag_counts.get((word, p), 0) for p in index.get(word, {})) < min_count:
        return None
    if not WORD_RE.match(word) or word in BLOCKED_WORDS:
        return None
    # Senses where the word is written in lowercase: "Bush" the president is not "bush".
    by_pos = {pos: [synsets[(pos, off)] for off in offsets
                    if word in synsets[(pos, off)].words]
              for pos, offsets in index.get(word, {}).items()}
    by_pos = {pos: senses for pos, senses in by_pos.items() if senses}
    if not by_pos or is_blocked([s for senses in by_pos.values() for s in senses], synsets):
        return None
    ranked = tuple(sorted(by_pos, key=lambda p: (-tag_counts.get((word, p), 0),
                                                 POS_ORDER.index(p))))
    # Senses marked with a usage domain (slang, archaism, trade name...) are poor defaults.
    usable = {pos: [s for s in senses if not s.usage] for pos, senses in by_pos.items()}
    if not usable[ranked[0]]:
        return None
    example = pick_example(word, [s for pos in ranked for s in usable[pos]])
    if example is None:
        return None
    # Counts of parts of speech where the word is only a proper noun do not make it common.
    count = sum(tag_counts.get((word, p), 0) for p in ranked)
    if count < min_count:
        return None
    return WordEntry(word, count, ranked, usable[ranked[0]][0].definition, example)


def with_article(pos: str) -> str:
    name = POS_NAMES[pos]
    return ("an " if name[0] in "aeiou" else "a ") + name


def part_of_speech_answer(entry: WordEntry) -> str:
    first, others = entry.pos_ranked[0], entry.pos_ranked[1:]
    if not others:
        return f'"{entry.word}" is {with_article(first)}.'
    rest = [with_article(p) for p in others]
    listed = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " or " + rest[-1]
    return f'"{entry.word}" is most often used as {with_article(first)}; it can also be {listed}.'


def definition_answer(entry: WordEntry) -> str:
    definition = entry.definition
    if definition[-1] not in ".!?":
        definition += "."
    return f"{entry.word} ({POS_NAMES[entry.pos_ranked[0]]}): {definition}"


def records_for(entry: WordEntry) -> list[dict[str, str]]:
    w = entry.word
    return [
        {"instruction": f'Define the word "{w}".', "input": "", "output": definition_answer(entry)},
        {"instruction": f'Use the word "{w}" in a sentence.', "input": "", "output": entry.example},
        {"instruction": f'What part of speech is the word "{w}"?', "input": "",
         "output": part_of_speech_answer(entry)},
    ]


# ---------------------------------------------------------------------------------------------
# Sampling, splitting, writing
# ---------------------------------------------------------------------------------------------

def candidate_entries(wordnet_dir: str, min_count: int) -> list[WordEntry]:
    """Every qualifying word tagged at least min_count times in SemCor, sorted by word."""
    synsets = read_synsets(wordnet_dir)
    index = read_index(wordnet_dir)
    tag_counts = read_tag_counts(wordnet_dir)
    entries = (build_entry(word, index, synsets, tag_counts, min_count) for word in sorted(index))
    return [e for e in entries if e is not None]


def sample_and_split(entries, words: int, eval_fraction: float, seed: int):
    """A seeded sample of `words` entries; the first round(words * eval_fraction) are eval."""
    # random.Random(seed).sample is specified on top of getrandbits, stable across platforms
    # and Python versions since 3.2 for an int seed and a sequence.
    chosen = random.Random(seed).sample(entries, min(words, len(entries)))
    n_eval = round(len(chosen) * eval_fraction)
    return chosen[n_eval:], chosen[:n_eval]


def write_jsonl_atomic(path: str, records) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".tmp.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a dataset is meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (train.jsonl, eval.jsonl)")
    p.add_argument("--wordnet-dir", default="/usr/share/wordnet",
                   help="WordNet database directory (default: %(default)s)")
    p.add_argument("--words", type=int, default=3000, help="words to sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="fraction of the words held out (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=3,
                   help="least SemCor tag count of a word: how common it must be "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    if args.words < 1:
        p.error("--words must be >= 1")
    if not 0.0 <= args.eval_fraction <= 1.0:
        p.error("--eval-fraction must be in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [n for n in [*DATA_FILES.values(), *INDEX_FILES.values(), "cntlist.rev"]
               if not os.path.isfile(os.path.join(args.wordnet_dir, n))]
    if missing:
        print(f"error: {args.wordnet_dir} lacks {', '.join(missing)} "
              "(install the Debian package wordnet-base, or pass --wordnet-dir)", file=sys.stderr)
        return 2
    entries = candidate_entries(args.wordnet_dir, args.min_count)
    train, held_out = sample_and_split(entries, args.words, args.eval_fraction, args.seed)
    if len(train) + len(held_out) < args.words:
        print(f"warning: only {len(entries)} words qualify; using all of them", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    train_records = [r for e in train for r in records_for(e)]
    eval_records = [r for e in held_out for r in records_for(e)]
    write_jsonl_atomic(os.path.join(args.out, "train.jsonl"), train_records)
    write_jsonl_atomic(os.path.join(args.out, "eval.jsonl"), eval_records)
    print(f"wordnet dataset: {len(train) + len(held_out)} words ({len(train)} train, "
          f"{len(held_out)} eval) of {len(entries)} candidates, "
          f"{len(train_records) + len(eval_records)} records ({len(train_records)} train, "
          f"{len(eval_records)} eval), seed {args.seed} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
