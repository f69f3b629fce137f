"""`python -m raypipe.prepare --ray`: the inputs read, tokenized and written as shards by a Ray Data pipeline.

    INPUT paths or URIs (file://, s3://, gs://: any pyarrow filesystem)
      -> Ray Data's readers: read_parquet (the text column), read_json (.jsonl), read_binary_files (.txt,
         split into documents by --txt-split as raypipe/documents.py does)
      -> documents: one row per non-empty document (+ the counts of empty ones and of invalid UTF-8 bytes)
      -> map_batches on a pool of actors that load the tokenizer once: the train/val split by the same keyed
         hash as the local path, tokens, and each batch's train and val tokens written straight to the output
         as shards `{split}-{index:05d}.bin` (indices from a small counter actor: no renames on object storage)
      -> the driver iterates one small summary row per batch: progress, then meta.json (the sharded layout
         of SHARDS in raypipe/datafiles.py), written last.

Where it reads and writes (paths or URIs; a temporary sibling directory renamed into place, or a URI prefix
with meta.json written last): raypipe/prepare_io.py. On a cluster a local --out must be shared by every node.
Limits: a .txt file is read whole by one task (cut big .txt corpora into files, or use .jsonl/.parquet);
.jsonl goes through pyarrow's JSON reader, which refuses invalid UTF-8 and lone surrogates (the local path
replaces them) and reads a record without the text key as an empty document (the local path refuses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from .datafiles import SPLITS, TOKEN_DTYPES, dtype_for_vocab
from .documents import Options, PrepareError, Task, check_split_options, from_arrow, take_documents, txt_documents, val_mask
from .errors import UserError
from .joining import check_cluster_answers
from .prepare_io import Output, Source, plan_sources, sharded_meta, write_file
from .tokenize_files import Progress, local_cores
from .tokenizer import EOT, TokenizerSpec, byte_spec, encode_utf8, encode_with_lengths, file_spec, gpt2_spec, \
    hf_spec, parse_spec, split_document, train_bpe

SHARD_DOCS = 16_384  # documents per map_batches batch, so per shard: ~10-50 MB of text at TinyStories-FineWeb sizes
_SPLIT_CODE = {None: -1, "train": 0, "val": 1}  # the documents' "split" column: -1 by hash, else forced
DOC_SCHEMA = pa.schema([("doc", pa.large_string()), ("split", pa.int8()), ("nbytes", pa.int64()),
                        ("empty", pa.int64()), ("bad", pa.int64()), ("first_bad", pa.string())])


# --- documents: Ray Data's readers -> one row per document ----------------------------------------------


def _doc_table(arr, split: Optional[str], nbytes: int, empty: int, bad: int, first_bad: str) -> pa.Table:
    """Rows of DOC_SCHEMA: the non-empty documents; the block's counts ride on its first row (a row with a null
    document when it has none)."""
    arr = pa.array(arr, pa.large_string()) if isinstance(arr, list) else arr.cast(pa.large_string())
    n = max(len(arr), 1)
    if not len(arr):
        arr = pa.nulls(1, pa.large_string())
    zeros = np.zeros(n, np.int64)
    counts = [np.r_[[v], zeros[1:]] for v in (nbytes, empty, bad)]
    return pa.table([arr, pa.array(np.full(n, _SPLIT_CODE[split], np.int8)), *map(pa.array, counts),
                     pa.array([first_bad or None] + [None] * (n - 1), pa.string())], schema=DOC_SCHEMA)


def _txt_docs(batch: pa.Table, split: Optional[str], txt_split: str) -> pa.Table:
    tables = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        d = txt_documents(data, txt_split, path)
        tables.append(_doc_table(d.strings(), split, d.nbytes, 0, d.bad_bytes, d.first_bad))
    return pa.concat_tables(tables) if tables else DOC_SCHEMA.empty_table()


def _column_docs(batch: pa.Table, split: Optional[str], column: str) -> pa.Table:
    col = batch.column(column)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    keep = pa.compute.and_(col.is_valid(), pa.compute.greater(pa.compute.binary_length(col), 0))
    docs = col.filter(keep)
    nbytes = int(pa.compute.sum(pa.compute.binary_length(docs)).as_py() or 0)
    return _doc_table(docs, split, nbytes, len(col) - len(docs), 0, "")


def documents_dataset(sources: list[Source], opts: Options):
    """One Ray Dataset of DOC_SCHEMA rows from every source (reading and splitting run in Ray tasks)."""
    import ray

    parts = []
    for s in sources:
        if s.fmt == "txt":
            ds = ray.data.read_binary_files(list(s.paths), include_paths=True, filesystem=s.fs, num_cpus=0)
            fn, kwargs = _txt_docs, {"split": s.split, "txt_split": opts.txt_split}
        elif s.fmt == "jsonl":
            from pyarrow import json as pajson

            parse = pajson.ParseOptions(explicit_schema=pa.schema([(opts.text_column, pa.string())]),
                                        unexpected_field_behavior="ignore")
            ds = ray.data.read_json(list(s.paths), filesystem=s.fs, parse_options=parse, file_extensions=None, num_cpus=0)
            fn, kwargs = _column_docs, {"split": s.split, "column": opts.text_column}
        else:
            ds = ray.data.read_parquet(list(s.paths), filesystem=s.fs, columns=[opts.text_column], file_extensions=None,
                                       num_cpus=0)
            fn, kwargs = _column_docs, {"split": s.split, "column": opts.text_column}
        # num_cpus=0: reading and cutting into documents run beside the tokenizing actors, which hold the CPUs
        # (a pool as large as the cluster would otherwise leave them none: a pipeline that never starts).
        parts.append(ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, num_cpus=0))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _batch_documents(batch: pa.Table, opts: Options):
    """A batch of DOC_SCHEMA rows -> (Documents, is_val) of its non-empty documents."""
    col = batch.column("doc").combine_chunks()
    codes = batch.column("split").to_numpy()[col.is_valid().to_numpy(zero_copy_only=False)]
    docs = from_arrow(col)
    hashed = val_mask(docs, Task("", "", 0, 0), opts)
    return docs, np.where(codes < 0, hashed, codes == 1)


# --- tokenizing and writing: an actor pool ----------------------------------------------------------------


def _counter_class():
    import ray

    @ray.remote(num_cpus=0)
    class ShardCounter:
        """Hands out shard indices per split, so no two writers ever pick the same file name."""

        def __init__(self):
            self.next = {split: 0 for split in SPLITS}

        def take(self, split: str) -> int:
            self.next[split] += 1
            return self.next[split] - 1

    return ShardCounter


class TokenizeAndWrite:
    """map_batches actor: the tokenizer is loaded once; each batch becomes at most one shard per split."""

    def __init__(self, spec: TokenizerSpec, dtype: str, opts: Options, fs: pafs.FileSystem, root: str, counter):
        self.spec, self.dtype, self.opts, self.fs, self.root, self.counter = spec, dtype, opts, fs, root, counter
        if spec.kind != "byte":  # the encoder is built (tokenizer.json parsed) here, once per actor
            encode_with_lengths(spec, ["warm up"], TOKEN_DTYPES[dtype])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        docs, is_val = _batch_documents(batch, self.opts)
        if self.spec.kind == "byte":  # straight from the UTF-8 bytes, as tokenize_files.tokenize_task does
            tokens = encode_utf8(docs.data, docs.offsets, self.spec.eot_id, TOKEN_DTYPES[self.dtype])
            lengths = np.diff(docs.offsets) + 1
        else:
            tokens, lengths = encode_with_lengths(self.spec, docs.strings(), TOKEN_DTYPES[self.dtype])
        if tokens.size and int(tokens.max()) >= self.spec.vocab_size:
            raise PrepareError(f"token id {int(tokens.max())} >= vocab_size {self.spec.vocab_size}")
        row = {"docs_train": int(len(docs) - is_val.sum()), "docs_val": int(is_val.sum()),
               "nbytes": int(pa.compute.sum(batch.column("nbytes")).as_py() or 0),
               "empty": int(pa.compute.sum(batch.column("empty")).as_py() or 0),
               "bad": int(pa.compute.sum(batch.column("bad")).as_py() or 0),
               "first_bad": next((x for x in batch.column("first_bad").to_pylist() if x), "")}
        for split, keep in (("train", ~is_val), ("val", is_val)):
            ids = take_documents(tokens, lengths, keep)
            file, digest = "", ""
            if ids.size:
                data = np.ascontiguousarray(ids).tobytes()
                file = f"{split}-{ray.get(self.counter.take.remote(split)):05d}.bin"
                write_file(self.fs, f"{self.root}/{file}", data)
                digest = hashlib.sha256(data).hexdigest()
            row.update({f"{split}_file": file, f"{split}_tokens": int(ids.size), f"{split}_sha256": digest})
        return pa.Table.from_pylist([row])


# --- the tokenizer: bpe:N trained in one Ray task ----------------------------------------------------------


def _train_bpe_task(sources: list[Source], opts: Options, vocab: int) -> str:
    """In a Ray task: the train documents streamed through the same reading pipeline into the BPE trainer,
    so no corpus byte passes through the driver. Returns the tokenizer.json text."""
    def train_docs():
        for batch in documents_dataset(sources, opts).iter_batches(batch_format="pyarrow", batch_size=4096):
            docs, is_val = _batch_documents(batch, opts)
            pieces = [p for t, v in zip(docs.strings(), is_val) if not v for p in split_document(t)]
            if pieces:
                yield pieces

    return train_bpe(train_docs(), vocab).to_str()


def build_spec(tokenizer: str, sources: list[Source], opts: Options, eot: str, log) -> TokenizerSpec:
    kind, arg = parse_spec(tokenizer)
    if kind != "bpe":
        return {"byte": byte_spec, "gpt2": gpt2_spec}[kind]() if kind != "file" else file_spec(arg, eot)
    import ray
    from tokenizers import Tokenizer

    start = time.perf_counter()
    train = [s for s in sources if s.split != "val"]
    # num_cpus=0: the pipeline it drives holds the CPUs; with one CPU held here a 1-CPU cluster would wait forever.
    text = ray.get(ray.remote(num_cpus=0)(_train_bpe_task).remote(train, opts, arg))
    spec = hf_spec(Tokenizer.from_str(text), "bpe")
    log(f"[prepare] trained a byte-level BPE, vocab {spec.vocab_size}, in {time.perf_counter() - start:.1f} s (one Ray task)")
    return spec


# --- the driver -------------------------------------------------------------------------------------------


class ShardProgress(Progress):
    """Progress's status line, fed by the pipeline's summary rows (one per written batch)."""

    def add(self, row: dict) -> None:
        self.count(row["docs_train"] + row["docs_val"], row["train_tokens"] + row["val_tokens"], row["nbytes"])

    def line(self, now: Optional[float] = None) -> str:
        secs = max((now or time.perf_counter()) - self.start, 1e-9)
        return (f"[prepare] {self.tasks} batches  {self.docs:,} docs  {self.tokens:,} tokens  "
                f"{self.nbytes / 1e6:,.1f} MB  {self.nbytes / 1e6 / secs:,.1f} MB/s  {self.tokens / secs:,.0f} tokens/s")


def _user_error(e: BaseException) -> Optional[Exception]:
    """The cause of a failed pipeline when it is the input's fault (a bad record, an unreadable file)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return PrepareError(str(e))
        if isinstance(e, json.JSONDecodeError):  # Ray's fallback after pyarrow's JSON reader refused a .jsonl
            return PrepareError("a .jsonl input holds a record pyarrow's JSON reader refuses (invalid UTF-8, a lone "
                                "surrogate, a value under the text column that is not a string, or a line that is "
                                "not a JSON object); prepare without --ray names the file and the record")
        if isinstance(e, (pa.ArrowInvalid, UnicodeDecodeError, FileNotFoundError)):
            return PrepareError(f"reading the inputs failed: {type(e).__name__}: {e}")
        e = getattr(e, "cause", None) or e.__cause__
    return None


def connect(workers: Optional[int]) -> bool:
    """Join RAY_ADDRESS or an initialized Ray, else start a local one; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        check_cluster_answers(os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=max(local_cores(), workers or 0), include_dashboard=False, log_to_driver=False)
    return True


def prepare_ray(inputs: list[str], out: str | Path, tokenizer: str = "byte", *, val_fraction: float = 0.01,
                val_inputs: Optional[list[str]] = None, text_column: str = "text", txt_split: str = "blank",
                seed: int = 0, eot: str = EOT, workers: Optional[int] = None, shard_docs: int = SHARD_DOCS,
                progress: bool = True, log=print) -> dict:
    """Tokenize `inputs` into the sharded data directory or URI prefix `out` on Ray; return the meta."""
    parse_spec(tokenizer)
    check_split_options(txt_split, val_fraction, val_inputs)
    if (workers is not None and workers < 1) or shard_docs < 1:
        raise PrepareError(f"--workers {workers} / --shard-docs {shard_docs}: expected integers >= 1")
    opts = Options(text_column, txt_split, val_fraction, seed)
    sources, train_names, val_names = plan_sources(inputs, val_inputs or [], opts)
    output = Output(str(out), log)
    import ray

    connected = connect(workers)
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # our own line instead
    try:
        spec = build_spec(tokenizer, sources, opts, eot, log)
        dtype = dtype_for_vocab(spec.vocab_size)
        # --workers N: a pool of N actors; else from 1 up to one per CPU of the cluster, as the queue asks.
        pool = ray.data.ActorPoolStrategy(size=workers) if workers else \
            ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1))))
        summaries = documents_dataset(sources, opts).map_batches(
            TokenizeAndWrite, batch_size=shard_docs, batch_format="pyarrow", num_cpus=1,
            compute=pool,
            fn_constructor_kwargs={"spec": spec, "dtype": dtype, "opts": opts, "fs": output.fs, "root": output.root,
                                   "counter": _counter_class().remote()})
        bar, rows = ShardProgress(0, enabled=progress), []
        for row in summaries.iter_rows():
            rows.append(row)
            bar.add(row)
        bar.close()
        meta = sharded_meta(rows, spec, dtype, train_names, val_names, opts)
        output.commit(meta, np.dtype(TOKEN_DTYPES[dtype]).itemsize, {"tokenizer.json": spec.json} if spec.json else {})
    except BaseException as e:
        output.abort()
        cause = _user_error(e) if not isinstance(e, UserError) else None
        if cause is not None:
            raise cause from None
        raise
    finally:
        ctx.enable_progress_bars = bars
        if connected:
            ray.shutdown()
    docs, tokens = meta["documents"], meta["tokens"]
    src = meta["source"]
    log(f"[prepare] {out}: {docs['train']:,} train / {docs['val']:,} val documents, {tokens['train']:,} / "
        f"{tokens['val']:,} tokens in {len(meta['shards']['train'])} + {len(meta['shards']['val'])} shards, "
        f"vocab {spec.vocab_size} ({dtype})"
        + (f"; {src['empty_documents']:,} empty documents skipped" if src["empty_documents"] else "")
        + (f"; {src['invalid_utf8_bytes']:,} invalid UTF-8 bytes replaced by U+FFFD (first: {src['first_invalid_utf8']})"
           if src["invalid_utf8_bytes"] else ""))
    return meta


