"""Single-process engine: a model, its tokenizer and chat template, and a generation loop.

Daemon workers reuse the model objects; this module is what `dsd generate`, `dsd logits` and
`dsd bench` run, and the reference every multi-process answer must equal token for token.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dsd.shard.batch import Batch
from dsd.shard.model_path import resolve_model


def set_threads(n: int | None) -> int:
    """Set numba's compute threads (default: every CPU this process may run on)."""
    import numba

    avail = len(os.sched_getaffinity(0))
    n = min(n or avail, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(max(1, n))
    return numba.get_num_threads()


@dataclass
class StepOutput:
    token: int
    text: str            # newly printable text (may be empty while UTF-8 or a stop string is pending)
    finish_reason: str | None = None  # "stop" | "length" | None


class Engine:
    def __init__(self, model_path: str | None = None, threads: int | None = None,
                 prefault: bool | None = None, weights: str = "auto"):
        """weights: "copy" = every tensor copied into huge pages at load (weights.HugePageWeights:
        ~1.1x decode over the file's 4 KiB page-cache pages); "mmap" = computed from the file's
        mapping, zero copy; "auto" (default) = copy when the file takes under half of the
        available memory, else mmap.  prefault (mmap only): map the file's pages at load rather
        than during the first prompt (default: under the same condition; GGUFModel.prefault)."""
        from dsd.shard.chat_template import ChatTemplate
        from dsd.shard.gguf_file import open_gguf
        from dsd.shard.models import build_model
        from dsd.shard.tokenizer import Tokenizer

        self.threads = set_threads(threads)
        self.path = resolve_model(model_path)
        self.gguf = open_gguf(self.path)
        if weights not in ("auto", "copy", "mmap"):
            from dsd.errors import DsdError
            raise DsdError(f"weights={weights!r}: use 'auto', 'copy' (huge pages) or 'mmap' (zero copy)")
        import psutil
        # when the whole file fits easily beside everything else in RAM
        fits = sum(map(os.path.getsize, self.gguf.paths)) < 0.5 * psutil.virtual_memory().available
        source = None
        if weights == "copy" or (weights == "auto" and fits):
            from dsd.shard.weights import HugePageWeights
            source = HugePageWeights(self.gguf)
        elif prefault or (prefault is None and fits):
            self.gguf.prefault()
        self.weights = source
        self.weight_pages = source.page_kind() if source is not None else "file mmap (4k)"
        self.model = build_model(self.gguf, weights=source)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.chat_template = ChatTemplate.from_metadata(self.gguf.metadata)

    # -- prompts ---------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.chat_template.render(messages, add_generation_prompt=True)
        # the template already writes BOS when the model wants it
        return self.tokenizer.encode(text, add_bos=False, parse_special=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    # -- forward passes --------------------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [n_tokens, vocab]: one forward pass over the whole sequence from an empty cache."""
        cache = self.model.new_cache(max(len(tokens), 1))
        return self.model.forward(Batch.single(cache, tokens, all_logits=True))

    def generate(self, prompt_ids: list[int], params) -> Iterator[StepOutput]:
        """Prefill the prompt as one batch, then decode one token at a time: the daemon's
        scheduler (stop ids and strings, length, incremental detokenization, the context check)
        driving this process's model (daemon/driver.py LocalDriver)."""
        import threading

        from dsd.daemon.driver import LocalDriver
        from dsd.daemon.scheduler import Request, Scheduler
        from dsd.errors import DsdError

        params.validate()
        if not prompt_ids:
            raise ValueError("empty prompt")
        ctx = self.model.args.context_length
        sent: list[dict] = []
        ready = threading.Event()
        ready.set()
        sched = Scheduler(self.tokenizer, LocalDriver(self.model, ctx), ctx, max_batch=1,
                          prefill_chunk=len(prompt_ids), send=lambda client, msg: sent.append(msg),
                          ready_event=ready, log=lambda msg: None)
        sched._admit(Request("generate", b"", list(prompt_ids), params, stream=True))
        while True:
            for msg in sent:
                if msg["type"] == "error":
                    raise DsdError(msg["message"])
                ids = msg["token_ids"]
                for k, tok in enumerate(ids):  # one StepOutput per token; text with the last
                    last = k == len(ids) - 1
                    yield StepOutput(tok, msg["text"] if last else "", msg["finish_reason"] if last else None)
            sent.clear()
            if not sched.active:
                return
            sched.step()
