"""Benchmark `python -m raypipe.prepare` against a plain single-process loop; prints a markdown table.

    python benchmarks/bench_prepare.py [--mb 200] [--small-mb 50] [--dir /tmp/raypipe-bench] [--bpe-vocab 8192]

The corpus is generated stories (raypipe.corpus.stories) as .jsonl, TinyStories' shape, written to
--dir (never the repo). Every measured run is a child process: wall time includes its start
(imports), and memory is measured from outside. Peak memory is reported two ways: the largest
single process (ru_maxrss from wait4, which covers its waited-for children too) and the peak of the
process tree's summed PSS, sampled every 0.1 s (PSS splits pages shared after fork fairly, so the
sum is what the tree really holds).

The baseline reads the same file line by line, json-decodes, encodes in batches of 1,024 documents
with the same encoder as prepare (raypipe.tokenizer.encode_documents: the tokenizers library for BPE,
a vectorised UTF-8 -> uint16 copy for byte), appends end-of-text and writes one .bin: read, encode,
write, one process. For BPE it runs with TOKENIZERS_PARALLELISM=false (one thread: a single-process
loop) and again with the tokenizers library's own threads, since `encode_batch` alone already uses
every core. The "ceiling" row runs two such loops at once, each on one half of the corpus (cut at a
line): what two cores give the plain loop's own work, without prepare's split, checksum and ordering.

This process itself imports nothing heavy (the corpus is generated in a child): a forked child's
ru_maxrss would otherwise start at this process' size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout


def baseline(corpus: str, out: str, tokenizer: str) -> None:
    """The plain loop (run in a child process by `measure`)."""
    import numpy as np

    from raypipe.tokenizer import byte_spec, encode_documents, file_spec

    spec = byte_spec() if tokenizer == "byte" else file_spec(tokenizer)
    dtype = np.uint16 if spec.vocab_size <= 65536 else np.uint32
    docs, tokens = [], 0
    with open(corpus, encoding="utf-8") as f, open(out, "wb") as w:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) == 1024:
                ids = encode_documents(spec, docs, dtype)
                w.write(ids.tobytes())
                tokens, docs = tokens + ids.size, []
        ids = encode_documents(spec, docs, dtype)
        w.write(ids.tobytes())
        tokens += ids.size
    print(json.dumps({"tokens": tokens}))


def make_corpus(path: Path, mb: int) -> None:
    if path.is_file() and path.stat().st_size >= mb * 1e6:
        return
    subprocess.run([sys.executable, __file__, "--make-corpus", str(path), str(mb)], check=True)


def write_corpus(path: Path, mb: int) -> None:
    from raypipe.corpus import stories  # imports torch (raypipe.data): only in a child

    tmp, seed, size = path.with_suffix(".tmp"), 0, 0
    with open(tmp, "w") as f:
        while size < mb * 1e6:
            for s in stories(10_000, seed):
                line = json.dumps({"text": s}) + "\n"
                f.write(line)
                size += len(line)
            seed += 1
    os.replace(tmp, path)


def tree_pss_kb(pid: int) -> int:
    """Summed PSS (kB) of `pid` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; wall seconds, largest single-process max RSS (MB) and the peak summed PSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    peak = [0]

    def sample():
        while proc.returncode is None:
            peak[0] = max(peak[0], tree_pss_kb(proc.pid))
            time.sleep(0.1)  # byte runs last about a second

    threading.Thread(target=sample, daemon=True).start()
    out_buf = proc.stdout.read()  # drain before waiting (a full pipe would block the child)
    err_buf = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err_buf.decode()[-3000:]}")
    return {"wall": wall, "maxrss_mb": usage.ru_maxrss / 1024, "pss_mb": peak[0] / 1024,
            "stdout": out_buf.decode(), "stderr": err_buf.decode()}


def halves(path: Path) -> tuple[Path, Path]:
    """The corpus cut in two at the line nearest its middle (for the ceiling row), streamed: this
    process must stay small (see the module docstring)."""
    a, b = path.with_suffix(".half1.jsonl"), path.with_suffix(".half2.jsonl")
    size = path.stat().st_size
    if not (a.is_file() and b.is_file() and a.stat().st_size + b.stat().st_size == size):
        with open(path, "rb") as src:
            src.seek(size // 2)
            src.readline()
            cut = src.tell()
            src.seek(0)
            for dst, n in ((a, cut), (b, size - cut)):
                with open(dst, "wb") as out:
                    while n and (buf := src.read(min(n, 1 << 20))):
                        out.write(buf)
                        n -= len(buf)
    return a, b


def pair(*args: str) -> None:
    """Two plain loops at once (run in a child process by `measure`): HALF1 OUT1 HALF2 OUT2 TOKENIZER."""
    procs = [subprocess.Popen([sys.executable, __file__, "--baseline", corpus, out, args[4]], stdout=subprocess.PIPE)
             for corpus, out in ((args[0], args[1]), (args[2], args[3]))]
    tokens = sum(json.loads(p.communicate()[0])["tokens"] for p in procs)
    if any(p.returncode for p in procs):
        sys.exit("a loop failed")
    print(json.dumps({"tokens": tokens}))


def prepare_cmd(corpus: Path, out: Path, tokenizer: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "raypipe.prepare", str(corpus), "--out", str(out), "--tokenizer", tokenizer,
            "--quiet", *extra]


def tokens_of(out: Path) -> int:
    return sum(json.loads((out / "meta.json").read_text())["tokens"].values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--small-mb", type=int, default=50)
    ap.add_argument("--dir", default="/tmp/raypipe-bench")
    ap.add_argument("--bpe-vocab", type=int, default=8192)
    ap.add_argument("--skip-bpe-train", action="store_true", help="reuse DIR/bpe-tok/tokenizer.json")
    ap.add_argument("--only", choices=("byte", "bpe"), help="run one tokenizer's rows")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    big, small = root / f"stories-{a.mb}mb.jsonl", root / f"stories-{a.small_mb}mb.jsonl"
    make_corpus(big, a.mb)
    make_corpus(small, a.small_mb)
    mb = big.stat().st_size / 1e6
    print(f"corpus {big}: {mb:.1f} MB; load average before: {os.getloadavg()}", flush=True)

    def fresh(name: str) -> Path:
        p = root / name
        subprocess.run(["rm", "-rf", str(p)], check=True)
        return p

    rows = []

    def row(name: str, r: dict, tokens: int, size_mb: float = mb) -> dict:
        rows.append({"run": name, "MB": size_mb, **r, "tokens": tokens})
        print(f"{name}: {r['wall']:.2f} s, {size_mb / r['wall']:.1f} MB/s, {tokens / r['wall']:,.0f} tokens/s, "
              f"max RSS {r['maxrss_mb']:.0f} MB, peak tree PSS {r['pss_mb']:.0f} MB, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        return rows[-1]

    r = measure([sys.executable, "-c", "import raypipe.prepare"])  # paid by every run below
    print(f"start-up (python + import raypipe.prepare): {r['wall']:.2f} s, "
          f"max RSS {r['maxrss_mb']:.0f} MB", flush=True)
    if a.only != "bpe":
        byte_rows(a, root, big, small, fresh, row)
    if a.only != "byte":
        bpe_rows(a, root, big, small, fresh, row)
    table(rows)


def byte_rows(a, root, big, small, fresh, row) -> None:
    r = measure(prepare_cmd(big, fresh("byte"), "byte"))
    row("prepare byte (2 workers)", r, tokens_of(root / "byte"))
    r = measure([sys.executable, __file__, "--baseline", str(big), str(fresh("base-byte.bin")), "byte"])
    row("plain loop byte (1 process)", r, json.loads(r["stdout"])["tokens"])
    r = measure([sys.executable, __file__, "--pair", *pair_args(big, fresh, "byte"), "byte"])
    row("ceiling: 2 plain loops at once, one per half", r, json.loads(r["stdout"])["tokens"])
    r = measure(prepare_cmd(small, fresh("byte-small"), "byte"))
    row(f"prepare byte, {a.small_mb} MB corpus", r, tokens_of(root / "byte-small"), small.stat().st_size / 1e6)


def bpe_rows(a, root, big, small, fresh, row) -> None:
    """bpe:N end to end (training included), then tokenize-only with the trained tokenizer.json."""
    tok = root / "bpe-tok" / "tokenizer.json"
    if not (a.skip_bpe_train and tok.is_file()):
        r = measure(prepare_cmd(big, fresh("bpe-tok"), f"bpe:{a.bpe_vocab}"))
        row(f"prepare bpe:{a.bpe_vocab} (train + tokenize)", r, tokens_of(root / "bpe-tok"))
    r = measure(prepare_cmd(big, fresh("bpe"), str(tok)))
    row("prepare bpe tokenizer.json (2 workers)", r, tokens_of(root / "bpe"))
    r = measure([sys.executable, __file__, "--baseline", str(big), str(fresh("base-bpe.bin")), str(tok)],
                {"TOKENIZERS_PARALLELISM": "false"})
    row("plain loop bpe (1 process, 1 thread)", r, json.loads(r["stdout"])["tokens"])
    r = measure([sys.executable, __file__, "--baseline", str(big), str(fresh("base-bpe-mt.bin")), str(tok)],
                {"TOKENIZERS_PARALLELISM": "true"})
    row("plain loop bpe (1 process, tokenizers' threads)", r, json.loads(r["stdout"])["tokens"])
    r = measure([sys.executable, __file__, "--pair", *pair_args(big, fresh, "bpe"), str(tok)],
                {"TOKENIZERS_PARALLELISM": "false"})
    row("ceiling: 2 plain loops at once, one per half (1 thread each)", r, json.loads(r["stdout"])["tokens"])
    r = measure(prepare_cmd(small, fresh("bpe-small"), str(tok)))
    row(f"prepare bpe tokenizer.json, {a.small_mb} MB corpus", r, tokens_of(root / "bpe-small"),
        small.stat().st_size / 1e6)


def pair_args(big: Path, fresh, name: str) -> list[str]:
    a, b = halves(big)
    return [str(a), str(fresh(f"half1-{name}.bin")), str(b), str(fresh(f"half2-{name}.bin"))]


def table(rows: list[dict]) -> None:
    print("\n| run | corpus MB | wall s | MB/s | tokens/s | max RSS of one process MB | peak PSS of the tree MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for x in rows:
        print(f"| {x['run']} | {x['MB']:.0f} | {x['wall']:.2f} | {x['MB'] / x['wall']:.1f} | "
              f"{x['tokens'] / x['wall']:,.0f} | {x['maxrss_mb']:.0f} | {x['pss_mb']:.0f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        baseline(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "--pair":
        pair(*sys.argv[2:7])
    elif len(sys.argv) > 1 and sys.argv[1] == "--make-corpus":
        write_corpus(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
