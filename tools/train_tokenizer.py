"""Train a byte-level BPE tokenizer on the built-in corpus (Python's own docs and stdlib sources).

    python tools/train_tokenizer.py --out output/tokenizer.json [--vocab-size 4096] [--max-chars 2000000]

Prints a human-readable report, then, as the last line of stdout, one JSON object for scripts.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets threading defaults before anything heavy loads)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from ppzoo.data.corpus import builtin_documents, builtin_texts  # noqa: E402
from ppzoo.data.tokenizer import TOKENIZER_FILE, train_byte_level_bpe  # noqa: E402
from ppzoo.errors import PpzooError  # noqa: E402

ROUND_TRIP_EXAMPLE = "def greet(name):\n    return f\"Grüße, {name}! 👋\"  # tabs\tand  spaces\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write tokenizer.json (a file, or a directory)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    parser.add_argument(
        "--max-chars", type=int, default=2_000_000,
        help="train on the first this many characters of the corpus's train split (default 2000000)",
    )
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    return parser.parse_args(argv)


def output_file(out):
    """--out names the file, unless it is an existing directory or ends with a slash."""
    path = Path(out).expanduser()
    if path.is_dir() or str(out).endswith(("/", "\\")):
        return path / TOKENIZER_FILE
    return path


def chars_per_token_on_validation(tokenizer, max_chars=200_000):
    """Average characters per token on held-out text: the tokenizer's compression, higher is better."""
    texts = list(builtin_texts("validation", max_chars))
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return sum(len(t) for t in texts) / max(tokens, 1)


def main(argv=None):
    args = parse_args(argv)
    if args.max_chars is not None and args.max_chars <= 0:
        raise PpzooError(f"--max-chars must be positive, got {args.max_chars}.")
    file = output_file(args.out)
    # Catch an unwritable --out before training rather than after.
    if file.exists() and not file.is_file():
        raise PpzooError(f"--out {file} exists and is not a file; give a file path or a directory.")
    blocking_file = next((p for p in file.parents if p.exists() and not p.is_dir()), None)
    if blocking_file is not None:
        raise PpzooError(f"Cannot write --out {file}: {blocking_file} is a file, not a directory.")

    used = {"chars": 0, "documents": 0}

    def counted_texts():
        for text in builtin_texts("train", args.max_chars):
            used["chars"] += len(text)
            used["documents"] += 1
            yield text

    started = time.perf_counter()
    tokenizer = train_byte_level_bpe(counted_texts(), args.vocab_size, min_frequency=args.min_frequency)
    seconds = time.perf_counter() - started
    # Save before the report, so an unwritable --out fails fast (and not after printing a success story).
    saved = tokenizer.save(file)

    example_ids = tokenizer.encode(ROUND_TRIP_EXAMPLE)
    round_trip_ok = tokenizer.decode(example_ids) == ROUND_TRIP_EXAMPLE
    chars_per_token = chars_per_token_on_validation(tokenizer)
    total_train_documents = sum(1 for _ in builtin_documents("train"))

    print(f"Trained a byte-level BPE tokenizer in {seconds:.1f} s")
    print(f"  vocabulary      {tokenizer.vocab_size} tokens (bos={tokenizer.bos_id}, eos={tokenizer.eos_id}, "
          f"pad={tokenizer.pad_id})")
    print(f"  training text   {used['chars']:,} characters from {used['documents']} of "
          f"{total_train_documents} built-in train documents")
    print(f"  compression     {chars_per_token:.2f} characters per token on validation text")
    print(f"  round trip      {len(ROUND_TRIP_EXAMPLE)} chars -> {len(example_ids)} tokens -> "
          f"{'identical text' if round_trip_ok else 'DIFFERENT TEXT (bug)'}")
    print(f"  tokens          {[tokenizer.id_to_token(i) for i in example_ids[:12]]} ...")
    print(f"  saved to        {saved}")
    print(json.dumps({
        "tokenizer": str(saved),
        "vocab_size": tokenizer.vocab_size,
        "chars": used["chars"],
        "documents": used["documents"],
        "seconds": round(seconds, 3),
        "chars_per_token": round(chars_per_token, 3),
        "round_trip_ok": round_trip_ok,
    }))
    return 0 if round_trip_ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PpzooError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
