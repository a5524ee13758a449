"""dsd logits: float32 logits [n_tokens, n_vocab] of one forward pass, saved as .npy."""
from __future__ import annotations

HELP = "write the logits of a token sequence (one forward pass from an empty cache) to a .npy file"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", required=True, help='token ids, e.g. "1 2 3" (spaces or commas)')
    p.add_argument("--out", "-o", required=True, help="output .npy file")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--mmap", action="store_true",
                   help="compute from the file's mapping (zero copy) instead of a huge-page copy of the weights")


def run(args) -> int:
    import numpy as np

    from dsd.errors import DsdError
    from dsd.shard.engine import Engine

    try:
        tokens = [int(t) for t in args.tokens.replace(",", " ").split()]
    except ValueError:
        raise DsdError(f"--tokens must be integers separated by spaces, got {args.tokens!r}") from None
    if not tokens:
        raise DsdError("--tokens is empty; give at least one token id")
    engine = Engine(args.model, threads=args.threads, weights="mmap" if args.mmap else "auto")
    vocab = engine.model.args.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise DsdError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    logits = np.ascontiguousarray(engine.logits(tokens), dtype=np.float32)
    np.save(args.out, logits)
    print(f"wrote {args.out}: float32 {list(logits.shape)}")
    return 0
