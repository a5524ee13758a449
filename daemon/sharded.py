"""A placement applied to a plain model: every worker runs the model's own forward pass.

Each worker builds the normal model (shard/models/) over a weight source holding only its pieces
(daemon/slice_weights.py).  `ShardedModel` then replaces, on the worker that owns a layer, the
modules the plan splits with collective versions that compute this worker's share and combine it
with the other workers' shares over fixed worker<->worker channels (`PeerLinks`):

  routed experts (+ shared-expert rows)  ffn.experts(x [T, D], ids [T, k], w [T, k]) -> sum of shares
  head-split attention (MLA)             attn(x, batch): the owner's attn.prelude(x, batch), every
                                         worker's attn.heads(*prelude, batch) -> sum of shares
  dense FFN split by rows                ffn(x [T, D]) -> sum of shares
  output head split by vocab rows        output(x [R, D]) -> shares concatenated in worker order

and runs `model.block(i, h, batch)` for its own layers, unchanged.  For a layer it does not own,
a worker serves the same collectives in the same order (`collectives(plan, i)` is the one list
both sides follow), and where consecutive layers (or the embedding and the head) have different
owners the hidden state h [T, D] moves from one owner to the next.  Nothing here knows an
architecture: a model only has to keep the attribute names every model in shard/models/ has
(attn, ffn with router/experts/shared, output) and, to have its attention split by heads, the
prelude/heads pair.

Link protocol (one Channel per ordered pair a -> b; a sends requests, b answers each one):
request header {"k": what}, "what" naming the collective (e.g. "x12": layer 12's experts), so a
worker that disagrees with its peer about the plan fails loudly instead of mixing up shares.
A hand-over of h is answered at once with an empty reply, which the sender collects before its
next request on that link.
"""
from __future__ import annotations

import os

import numpy as np

from dsd.daemon.shm_channel import BadMessage, PeerDied


class PeerWorkerDied(Exception):
    """Another worker died during the step (its pidfd fired while we waited for it)."""

    def __init__(self, index: int):
        super().__init__(f"worker {index} died")
        self.index = index


def collectives(plan, i: int) -> list[str]:
    """The collectives layer i runs, in order ("attn", "experts", "ffn"), when split."""
    if not plan.split:
        return []
    out = ["attn"] if plan.split_attn(i) else []
    if i in plan.moe_layers:
        out.append("experts")
    elif plan.mode == "rows" and plan.split_ffn(i):
        out.append("ffn")
    return out


class PeerLinks:
    """This worker's fixed channels: out[j] carries our requests to worker j, inn[j] j's to us."""

    def __init__(self, me: int, out: dict, inn: dict, reply_spin: float, recv_spin: float):
        self.me, self.out, self.inn = me, out, inn
        self.reply_spin = reply_spin   # waiting for a share a peer computes alongside ours
        self.recv_spin = recv_spin     # waiting for a peer's next request
        self.unacked: set[int] = set()
        self.pids: dict[int, int] = {}
        self.messages = 0              # requests sent (for the message count in BENCHMARKS.md)

    @property
    def peers(self) -> list[int]:
        return sorted(self.out)

    def watch(self, pids: dict[int, int]) -> None:
        """Watch each peer's process (pidfd): a wait on a dead peer raises at once."""
        for j, pid in pids.items():
            if j == self.me or self.pids.get(j) == pid:
                continue
            fd = None
            try:
                fd = os.pidfd_open(pid)
            except (ProcessLookupError, TypeError, OSError):
                fd = None
            for ch in (self.out[j], self.inn[j]):
                if ch.peer_fd is not None and ch.peer_fd != fd:
                    try:
                        os.close(ch.peer_fd)
                    except OSError:
                        pass
                ch.peer_fd = fd if ch is self.out[j] else (os.dup(fd) if fd is not None else None)
            self.pids[j] = pid

    def begin_step(self, abort: tuple) -> None:
        for ch in (*self.out.values(), *self.inn.values()):
            ch.abort = abort

    def resync(self) -> None:
        """Forget every half-finished exchange (after a failed step, before the next one)."""
        for ch in self.out.values():
            ch.resync()
            ch.peer_at_send = ch.peer_fd
        for ch in self.inn.values():
            ch.seq = int(ch.ctl[0])
        self.unacked.clear()

    def _guard(self, j: int, fn):
        try:
            return fn()
        except PeerDied:
            raise PeerWorkerDied(j) from None
        except BadMessage as e:   # fails this step (the worker answers it), never the loop
            raise RuntimeError(f"from worker {j}: {e}") from None

    def send(self, j: int, what: str, arrays: dict) -> None:
        ch = self.out[j]
        if j in self.unacked:  # the answer to our last hand-over
            self._guard(j, lambda: ch.reply_wait(spin=self.reply_spin))
        ch.send({"k": what}, arrays)
        self.unacked.add(j)
        self.messages += 1

    def reply(self, j: int) -> dict:
        rh, arr = self._guard(j, lambda: self.out[j].reply_wait(spin=self.reply_spin))
        self.unacked.discard(j)
        if not rh.get("ok", False):
            raise RuntimeError(rh.get("error", f"worker {j} failed its share"))
        return arr

    def recv(self, j: int, what: str) -> dict:
        hdr, arr = self._guard(j, lambda: self.inn[j].wait_command(0.0, self.recv_spin))
        if hdr.get("k") != what:
            self.inn[j].reply({"ok": False, "error": f"worker {self.me} expected {what}"}, {})
            raise RuntimeError(f"worker {j} sent {hdr.get('k')!r} where the plan expects {what!r}: "
                               f"the workers disagree about the plan")
        return arr

    def answer(self, j: int, arrays: dict) -> None:
        self.inn[j].reply({"ok": True}, arrays)


class _Collective:
    def __init__(self, sm: "ShardedModel", what: str):
        self.sm, self.what = sm, what

    def gather(self, arrays: dict, own, add: bool = True):
        """Hand arrays to every peer, compute our share meanwhile, combine theirs."""
        links = self.sm.links
        for j in links.peers:
            links.send(j, self.what, arrays)
        mine = self.sm.share(own)
        parts = {links.me: mine}
        for j in links.peers:
            p = links.reply(j)["p"]
            if add:
                mine += p
            else:
                parts[j] = p
        return mine if add else np.concatenate([parts[j] for j in sorted(parts)], axis=-1)


class GatheredExperts(_Collective):
    """The owner's ffn.experts: routed experts (and the rows of the shared expert this worker
    holds) of every worker, summed: [T, D]."""

    def __init__(self, sm, what, local):
        super().__init__(sm, what)
        self.local = local

    def __call__(self, x, ids, w):
        return self.gather({"x": x, "ids": ids, "w": w}, lambda: self.local(x, ids, w))


class GatheredAttention(_Collective):
    """Head-split attention: the owner computes attn.prelude once (the latent, kept by every
    worker's cache), each worker its heads; the output projections' shares are summed."""

    def __init__(self, sm, what, attn):
        super().__init__(sm, what)
        self.attn = attn

    def __call__(self, x, batch):
        parts = self.attn.prelude(x, batch)
        arrays = {str(k): a for k, a in enumerate(parts)}
        return self.gather(arrays, lambda: self.attn.heads(*parts, batch))


class GatheredFFN(_Collective):
    def __init__(self, sm, what, ffn):
        super().__init__(sm, what)
        self.ffn = ffn

    def __call__(self, x):
        return self.gather({"x": x}, lambda: self.ffn(x))


class GatheredHead(_Collective):
    """Output head split by vocab rows: [R, D] -> [R, V], the workers' rows in order."""

    def __init__(self, sm, what, output):
        super().__init__(sm, what)
        self.output = output

    def __call__(self, x):
        return self.gather({"x": x}, lambda: self.output(x), add=False)


def _local_experts(ffn, holds_shared: bool):
    experts, shared = ffn.experts, ffn.shared if holds_shared else None

    def run(x, ids, w):
        p = experts(x, ids, w)
        if shared is not None:
            p += shared(x)
        return p
    return run


class ShardedModel:
    """One worker's part of every forward pass (see the module docstring)."""

    def __init__(self, model, plan, me: int, links: PeerLinks | None, holds, share):
        self.m, self.plan, self.me, self.links = model, plan, me, links
        self.share = share    # share(fn): run fn with the threads of a concurrent share
        self.follow: dict[int, list] = {}   # layer -> [(what, serve(arrays, batch))] we answer
        p, m = plan, model
        for i in range(p.n_layers):
            mine = p.layer_owner[i] == me
            for kind in collectives(p, i):
                what = f"{kind[0]}{i}"
                if kind == "attn":
                    if mine:
                        m.attn[i] = GatheredAttention(self, what, m.attn[i])
                    else:
                        a = m.attn[i]
                        self._follow(i, what, lambda arr, b, a=a: a.heads(*[arr[str(k)] for k in range(len(arr))], b))
                elif kind == "experts":
                    f = m.ffn[i]
                    local = _local_experts(f, f.shared is not None and holds(f"blk.{i}.ffn_gate_shexp.weight"))
                    if mine:
                        f.experts, f.shared = GatheredExperts(self, what, local), None
                    else:
                        self._follow(i, what, lambda arr, b, local=local: local(arr["x"], arr["ids"], arr["w"]))
                else:
                    f = m.ffn[i]
                    if mine:
                        m.ffn[i] = GatheredFFN(self, what, f)
                    else:
                        self._follow(i, what, lambda arr, b, f=f: f(arr["x"]))
            if not mine:  # drop the inert objects of other workers' layers
                if "attn" not in collectives(p, i):
                    m.attn[i] = None
                if not collectives(p, i):
                    m.ffn[i] = None
        self.split_head = p.split and p.split_head()
        if self.split_head:
            if p.head_owner == me:
                m.output = GatheredHead(self, "h", m.output)
            else:
                out = m.output
                self._follow(p.n_layers, "h", lambda arr, b: out(arr["x"]))
        # who holds h before layer i (i = n_layers: before the head)
        self.holder = [p.embed_owner] + list(p.layer_owner) + [p.head_owner]

    def _follow(self, i: int, what: str, fn) -> None:
        self.follow.setdefault(i, []).append((what, fn))

    def _serve(self, i: int, owner: int, batch) -> None:
        for what, fn in self.follow.get(i, ()):
            arr = self.links.recv(owner, what)
            self.links.answer(owner, {"p": self.share(lambda: fn(arr, batch))})

    def _hand_over(self, h, i: int):
        """Before layer i (n_layers: the head), move h to its owner if it changes."""
        a, b, me = self.holder[i], self.holder[i + 1], self.me
        if a == b or me not in (a, b):
            return h
        if me == a:
            self.links.send(b, "h", {"h": h})
            return None
        arr = self.links.recv(a, "h")
        self.links.answer(a, {})
        return arr["h"]

    def forward(self, batch):
        """This worker's part of one forward pass: logits [R, vocab] on the head's owner
        (R = len(batch.logit_rows)), None elsewhere."""
        m, p, me = self.m, self.plan, self.me
        h = m.embed(batch.tokens) if p.embed_owner == me else None
        for i in range(p.n_layers):
            h = self._hand_over(h, i)
            if p.layer_owner[i] == me:
                h = m.block(i, h, batch)
            else:
                self._serve(i, p.layer_owner[i], batch)
        h = self._hand_over(h, p.n_layers)
        batch.finish()
        if p.head_owner != me:
            if self.split_head:
                self._serve(p.n_layers, p.head_owner, batch)
            return None
        if batch.logit_rows is not None:
            h = h[batch.logit_rows]
        return m.head(h)
