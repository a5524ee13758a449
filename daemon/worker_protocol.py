"""The coordinator <-> worker boundary: every message between them, typed (daemon/schema.py).

ZeroMQ control (workers.sock; activations never go this way):
  worker:  hello v, index, pid                       (versioned handshake: v must equal VERSION)
  coord:   assign v, plan, channel, links, node, cpus, ...  (what to load, where to talk)
  worker:  progress index, done, total[, phase] | ready v, index, pid, stats | fatal index, message
  coord:   stats -> worker: stats index, stats
  coord:   stop
A worker that dies is noticed through its pidfd (the "dead sentinel"), not through a message.

Shared-memory commands (the header of a coordinator channel message, COMMANDS; arrays beside):
  step    seqs, n, pos0 (the batch's segments), logit_rows, greedy (rows answered with their
          argmax), fork ([cached seq, new seq, positions, capacity] copied first: the prefix
          cache), caps (per segment: positions a new sequence's cache is allocated for), compact
          ([seq, positions]: shrink a cached sequence's buffers to what the prefix cache keeps),
          abort (the channel's abort counter when sent), free, pids   [tokens int64 [T]]
  resync  free, pids: reset the worker<->worker links after a failed step
  free    free, pids: drop these sequences' KV caches (also the empty command of a ping)
Reply header (REPLY): ok, and on failure error[, dead_peer: a worker that died][, aborted];
arrays: the head's owner [ids int64 [G]][, logits float32 [R - G, vocab]].
Link header (worker a -> worker b, daemon/sharded.py): {"k": what} naming the collective
("x12": layer 12's experts, "a3", "f0", "h": the head or a hand-over of h); checked against
what the receiver expects, so workers that disagree about the plan fail the step loudly.
A malformed command is answered with an error reply and logged; it never stops the loop.
"""
from __future__ import annotations

from dsd.daemon.protocol import VERSION  # noqa: F401  (one version for every boundary)
from dsd.daemon.schema import Any_, Bool, Int, IntList, Map, Num, OneOf, Registry, Schema, Str, build, decode  # noqa: F401

_INDEX = Int(0, 4095)
FROM_WORKER = Registry(
    "worker message",
    Schema("hello", {"index": _INDEX, "pid": Int(1)}, True),
    Schema("progress", {"index": _INDEX, "done": Int(0), "total": Int(0),
                        "phase": OneOf("allocating", "loading").optional()}),
    Schema("ready", {"index": _INDEX, "pid": Int(1), "stats": Map()}, True),
    Schema("fatal", {"index": _INDEX, "message": Str(1 << 16)}),
    Schema("stats", {"index": _INDEX, "stats": Map()}),
)
TO_WORKER = Registry(
    "coordinator message",
    Schema("assign", {"plan": Map(), "node": Int(0), "cpus": IntList(0), "threads": Int(0),
                      "pages": Str(16), "channel": Str(255, nonempty=True),
                      "channel_path": Str(4096).or_none(), "context": Int(1),
                      "coordinator_pid": Int(1), "spin_us": Num(),
                      "node_cpus": IntList(0).or_none(), "links": Any_().optional(),
                      "spin_between": Bool().optional(), "block_between": Bool().optional(),
                      "kv_type": OneOf("f32", "f16", "bf16", "q8_0").optional()}, True),
    Schema("stats", {}), Schema("stop", {}),
)


_SEQS = IntList(-1)
COMMANDS = Registry(
    "step command",
    Schema("step", {"seqs": _SEQS, "n": IntList(1), "pos0": IntList(0), "logit_rows": IntList(0),
                    "greedy": IntList(0).optional(), "fork": Any_().optional(), "caps": IntList(1).optional(), "compact": Any_().optional(), "abort": Int(0), "free": _SEQS.optional(),
                    "pids": Any_().optional()}),
    Schema("resync", {"abort": Int(0), "free": _SEQS.optional(), "pids": Any_().optional()}),
    Schema("free", {"abort": Int(0).optional(), "free": _SEQS.optional(), "pids": Any_().optional()}),
)
REPLY = Registry(
    "worker reply",
    Schema("reply", {"ok": Bool(), "error": Str(1 << 16).optional(), "dead_peer": Int(0, 4095).optional(),
                     "aborted": Bool().optional()}),
)
