"""The tokenizers `prepare` knows: gpt2 (tiktoken), bpe:N (trained on the corpus), byte, a tokenizer.json.

A tokenizer travels as a small picklable `TokenizerSpec` (kind, vocab size, end-of-text id and, for
Hugging Face tokenizers, the tokenizer.json text), so that worker processes and Ray tasks rebuild the
same encoder; `encode_documents` builds it once per process.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .errors import UserError

EOT = "<|endoftext|>"
BYTE_VOCAB = 257  # bytes 0..255, then the end-of-text token

SPEC_HELP = "gpt2, bpe:VOCAB (e.g. bpe:8192), byte, or a path to a tokenizer.json"

# The two files tiktoken's "gpt2" encoding reads, and their sha256 (as in tiktoken_ext.openai_public).
GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizerError(UserError):
    """The tokenizer spec is unknown or its files cannot be had; the message says what to do."""


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "gpt2" | "bpe" | "byte" | "file"
    vocab_size: int
    eot_id: int
    json: Optional[str] = None  # tokenizer.json text (bpe, file): written next to the data
    path: Optional[str] = None  # where a "file" tokenizer came from

    def meta(self) -> dict:
        meta = {"kind": self.kind, "file": "tokenizer.json" if self.json else None, "vocab_size": self.vocab_size}
        if self.kind == "gpt2":
            meta["encoding"] = "gpt2 (tiktoken)"
        if self.path:
            meta["source"] = self.path
        return meta


def parse_spec(text: str) -> tuple[str, Optional[int | str]]:
    """`--tokenizer` -> (kind, argument); an unknown spec is refused before any work starts."""
    if text in ("gpt2", "byte"):
        return text, None
    if text.startswith("bpe:"):
        try:
            vocab = int(text[4:])
        except ValueError:
            vocab = 0
        if vocab < BYTE_VOCAB:
            raise TokenizerError(f"--tokenizer {text!r}: bpe needs a vocab size of at least {BYTE_VOCAB} "
                                 "(256 bytes + end-of-text), e.g. bpe:8192")
        return "bpe", vocab
    if text.endswith(".json") or os.sep in text:
        if not Path(text).is_file():
            raise TokenizerError(f"--tokenizer {text!r}: no such file (expected a Hugging Face tokenizer.json)")
        return "file", text
    raise TokenizerError(f"unknown --tokenizer {text!r}: expected {SPEC_HELP}")


# --- building specs -----------------------------------------------------------------------------------


def byte_spec() -> TokenizerSpec:
    return TokenizerSpec("byte", BYTE_VOCAB, BYTE_VOCAB - 1)


def train_bpe(texts: Iterable, vocab_size: int):
    """A byte-level BPE (GPT-2 style) with an end-of-text special token, trained on `texts`.

    `texts` may be strings or lists of strings; it is consumed once, so a generator streams.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_spec(tok, kind: str, path: Optional[str] = None, eot: str = EOT) -> TokenizerSpec:
    """A spec for a `tokenizers.Tokenizer`; the end-of-text token must be in its vocabulary."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if eot not in vocab:
        specials = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        raise TokenizerError(f"{path or 'tokenizer'}: has no end-of-text token {eot!r}; pass --eot with one of "
                             f"its special tokens ({', '.join(specials) or 'it has none'})")
    return TokenizerSpec(kind, max(vocab.values()) + 1, vocab[eot], json=tok.to_str(), path=path)


def file_spec(path: str, eot: str = EOT) -> TokenizerSpec:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    return hf_spec(tok, "file", path, eot)


def tiktoken_cache_dir() -> str:
    """Where tiktoken looks for its files (the same rule as tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_spec(timeout: float = 10.0) -> TokenizerSpec:
    """GPT-2 through tiktoken, from its cache; fetched (with a timeout) only when not cached.

    tiktoken itself downloads without a timeout, so an offline machine could hang in it: the files
    are looked up in tiktoken's cache first, and a missing one is fetched here, failing at once
    (or after `timeout` seconds) with what to do instead.
    """
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    install = "" if tiktoken else ", and pip install 'raypipe[gpt2]' (tiktoken)"
    cache = tiktoken_cache_dir()
    for url, sha in GPT2_FILES.items():
        cached = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        if os.path.isfile(cached) and hashlib.sha256(Path(cached).read_bytes()).hexdigest() == sha:
            continue
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
            if hashlib.sha256(data).hexdigest() != sha:
                raise OSError(f"sha256 mismatch for {url}")
            os.makedirs(cache, exist_ok=True)
            Path(cached + ".tmp").write_bytes(data)
            os.replace(cached + ".tmp", cached)
        except OSError as e:
            raise TokenizerError(
                f"--tokenizer gpt2: tiktoken's BPE file is not cached in {cache} ({os.path.basename(cached)}, "
                f"from {url}) and it could not be fetched ({e}). Offline, copy the cache directory of a "
                "machine where `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` ran and point "
                f"TIKTOKEN_CACHE_DIR at it{install}; or use --tokenizer bpe:VOCAB (trained here) or byte, "
                "which need no download") from None
    if tiktoken is None:
        raise TokenizerError("--tokenizer gpt2 needs tiktoken: pip install 'raypipe[gpt2]' "
                             "(or use --tokenizer bpe:VOCAB or byte, which need nothing)")
    enc = tiktoken.get_encoding("gpt2")
    return TokenizerSpec("gpt2", enc.n_vocab, enc.eot_token)


# --- encoding -----------------------------------------------------------------------------------------

_ENCODERS: dict = {}  # one encoder per spec per process (a tokenizer.json parse is not free)


def _encoder(spec: TokenizerSpec):
    key = (spec.kind, spec.vocab_size, spec.eot_id, hash(spec.json))
    if key not in _ENCODERS:
        if spec.kind == "gpt2":
            import tiktoken

            enc = tiktoken.get_encoding("gpt2")
            _ENCODERS[key] = lambda docs: enc.encode_ordinary_batch(docs, num_threads=1)
        elif spec.kind in ("bpe", "file"):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(spec.json)
            batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets
            _ENCODERS[key] = lambda docs: [e.ids for e in batch(docs, add_special_tokens=False)]
        else:
            raise TokenizerError(f"unknown tokenizer kind {spec.kind!r}")
    return _ENCODERS[key]


def encode_utf8(data: np.ndarray, offsets: np.ndarray, eot_id: int, dtype) -> np.ndarray:
    """The byte tokenizer without per-document Python work: documents given as UTF-8 bytes back to back
    (`data`, uint8) and their bounds (`offsets`, one more than documents) -> ids, end-of-text after each."""
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros(0, dtype)
    body = data[offsets[0]:offsets[-1]]
    ends = offsets[1:] - offsets[0] + np.arange(n)  # where each end-of-text goes in the output
    out = np.empty(body.size + n, dtype)
    keep = np.ones(out.size, bool)
    keep[ends] = False
    out[keep] = body  # a masked copy: several times faster than np.insert
    out[ends] = eot_id
    return out


# Long documents are encoded in pieces: a tokenizer's memory grows with its input string (a 30 MB line
# took over 5 GB in a BPE), so no call gets more than PIECE_CHARS characters, and no batch of calls
# more than BATCH_CHARS. Cuts are made just before a whitespace character that precedes a non-space,
# where the GPT-2 pre-tokenizer splits anyway: there the tokens are the same as the whole document's.
PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 20
_LAST_CUT = re.compile(r".*\s(?=\S)", re.S)  # greedy: matches up to the last whitespace before a non-space


def split_document(doc: str, limit: int = PIECE_CHARS) -> list[str]:
    """`doc` in pieces of at most `limit` characters that join back to it. Each cut is before the last
    whitespace character of a window (before a non-space); a window without one is cut at `limit`."""
    if len(doc) <= limit:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > limit:
        m = _LAST_CUT.match(doc, start + limit // 2, start + limit)  # a cut in the window's second half
        cut = m.end() - 1 if m else start + limit
        pieces.append(doc[start:cut])
        start = cut
    pieces.append(doc[start:])
    return pieces


_CLEAN_CUTS: dict = {}


def _cuts_are_clean(spec: TokenizerSpec) -> bool:
    """Whether encoding in pieces gives the whole text's tokens for this tokenizer. Not for one that adds
    something per call (a prefix space, a Metaspace marker): its documents are encoded whole."""
    key = (spec.kind, spec.vocab_size, spec.eot_id, hash(spec.json))
    if key not in _CLEAN_CUTS:
        text = "Once upon a time,  a cat\nsat on 12 mats. The end!"
        encode = _encoder(spec)
        pieces = split_document(text, 16)
        _CLEAN_CUTS[key] = list(chain.from_iterable(encode(pieces))) == encode([text])[0]
    return _CLEAN_CUTS[key]


def encode_with_lengths(spec: TokenizerSpec, docs: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `docs`, each followed by the end-of-text id, as one flat array of `dtype`, and each
    document's token count (its end-of-text included). Long documents are encoded in pieces (see
    PIECE_CHARS); no end-of-text goes between the pieces of a document."""
    if not docs:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    if spec.kind == "byte":
        # "surrogatepass": a lone surrogate from a JSON escape is kept as bytes, not an error.
        parts = [d.encode("utf-8", "surrogatepass") for d in docs]
        offsets = np.cumsum([0] + [len(p) for p in parts])
        return encode_utf8(np.frombuffer(b"".join(parts), np.uint8), offsets, spec.eot_id, dtype), np.diff(offsets) + 1
    encode, eot = _encoder(spec), (spec.eot_id,)
    if max(map(len, docs)) <= PIECE_CHARS or not _cuts_are_clean(spec):  # the common case: whole documents
        pieces, last = docs, None
    else:
        split = [split_document(d) for d in docs]
        pieces = list(chain.from_iterable(split))
        owner = np.repeat(np.arange(len(docs)), [len(p) for p in split])  # the document of each piece
        last = np.append(owner[1:] != owner[:-1], True)  # the last piece of a document: end-of-text follows
    out, counts = [], []
    for a, b in _batches(pieces):
        ids = encode(pieces[a:b])
        counts.append(np.fromiter(map(len, ids), np.int64, len(ids)))
        ends = [True] * len(ids) if last is None else last[a:b].tolist()
        tokens = chain.from_iterable(chain.from_iterable((x, eot) if end else (x,) for x, end in zip(ids, ends)))
        out.append(np.fromiter(tokens, dtype, int(counts[-1].sum()) + sum(ends)))
    counts = np.concatenate(counts)
    lengths = counts if last is None else np.bincount(owner, weights=counts, minlength=len(docs)).astype(np.int64)
    return (out[0] if len(out) == 1 else np.concatenate(out)), lengths + 1


def _batches(pieces: list[str]) -> list[tuple[int, int]]:
    """[a, b) ranges of `pieces` of about BATCH_CHARS characters each: one encode call each."""
    bounds, size = [0], 0
    for k, piece in enumerate(pieces):
        size += len(piece)
        if size >= BATCH_CHARS:
            bounds.append(k + 1)
            size = 0
    if bounds[-1] < len(pieces):
        bounds.append(len(pieces))
    return list(zip(bounds, bounds[1:]))


def encode_documents(spec: TokenizerSpec, docs: list[str], dtype) -> np.ndarray:
    """Token ids of `docs`, each followed by the end-of-text id, as one flat array of `dtype`."""
    return encode_with_lengths(spec, docs, dtype)[0]


# --- prompts: encode and decode with what the data was tokenized with ------------------------------


class TextTokenizer:
    """encode/decode over whatever the data was tokenized with (meta.json's `tokenizer`)."""

    def __init__(self, meta: dict, folder: Path):
        spec = meta.get("tokenizer") or {}  # meta checked by datafiles.check_meta
        self.kind, self.eot_id = spec.get("kind"), meta.get("eot_id")
        file = spec.get("file")
        if file and (folder / file).is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / file))
            self._encode = lambda text: tok.encode(text).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
        elif self.kind == "gpt2":
            import tiktoken

            enc = tiktoken.get_encoding("gpt2")
            self._encode = lambda text: enc.encode_ordinary(text)
            self._decode = enc.decode
        elif self.kind == "byte":
            self._encode = lambda text: list(text.encode("utf-8"))
            self._decode = lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        else:
            raise TokenizerError(f"{folder}: no tokenizer to load (meta says {spec!r} and {file!r} is not there)")

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


def load_tokenizer(folder: str | Path, meta_name: str = "data_meta.json") -> TextTokenizer:
    folder = Path(folder)
    meta_path = folder / meta_name
    if not meta_path.is_file():
        raise TokenizerError(f"{meta_path} is missing: {folder} carries no tokenizer description")
    from .datafiles import parse_meta  # its fields checked before use: a DataError naming the key

    return TextTokenizer(parse_meta(meta_path.read_bytes(), str(meta_path)), folder)
