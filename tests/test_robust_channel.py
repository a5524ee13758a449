"""Shared-memory channel messages that are not what they should be (corrupted header bytes, a
bad length, an array table pointing outside the segment, an object dtype): reading one raises
BadMessage naming the channel, never another error, and the channel keeps working after it."""
from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest

from dsd.daemon.shm_channel import _HLEN, HDR, BadMessage, Channel, unlink_segment


@pytest.fixture
def pair(tmp_path):
    name = f"dsd-test-fuzz-{random.getrandbits(32):08x}"
    coord = Channel.create(name, 1 << 16, str(tmp_path), spin_us=10)
    worker = Channel.attach(name, str(tmp_path), spin_us=10)
    yield coord, worker
    worker.close()
    coord.close(unlink=True)
    unlink_segment(name)


def test_fuzzed_messages_raise_only_bad_message(pair):
    coord, worker = pair
    rng = random.Random(5)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    good = bad = 0
    for i in range(3000):
        coord.send({"type": "step", "seqs": [1], "n": [3]}, {"h": x})
        hb = bytearray(coord.hbuf[:int(coord.ctl[_HLEN])])
        r = rng.random()
        if r < 0.4:   # flipped / truncated header bytes
            for _ in range(rng.randint(1, 4)):
                hb[rng.randrange(len(hb))] = rng.getrandbits(8)
            if rng.random() < 0.3:
                del hb[rng.randrange(len(hb)):]
            hb = bytes(hb) or b"\xc1"
            coord.hbuf[:len(hb)] = hb
            coord.ctl[_HLEN] = len(hb)
        elif r < 0.6:   # a header length outside the region
            coord.ctl[_HLEN] = rng.choice([0, -5, HDR + 1, 2**40])
        elif r < 0.9:   # an array table pointing anywhere, with any dtype
            table = {"h": [rng.choice(["<f4", "|O", "<i8", "V8"]),
                           rng.choice([[3, 4], [10**9], [-1, 4], [2, "x"]]),
                           rng.choice([0, -64, 1 << 20, 2**62])]}
            hdr = msgpack.packb({"type": "step", "_arrays": table}, use_bin_type=True)
            coord.hbuf[:len(hdr)] = hdr
            coord.ctl[_HLEN] = len(hdr)
        try:
            hdr, arrays = worker.wait_command(0.0, 1e-3)
        except BadMessage as e:
            assert coord.name in str(e)
            bad += 1
            continue
        good += 1
        assert isinstance(hdr, dict) and all(isinstance(a, np.ndarray) for a in arrays.values())
    assert bad > 500 and good > 300, (good, bad)
    # and the channel still carries a normal message both ways
    coord.send({"type": "step", "seqs": [7]}, {"h": x})
    hdr, arrays = worker.wait_command(0.0, 1e-3)
    assert hdr["seqs"] == [7] and np.array_equal(arrays["h"], x)
    worker.reply({"type": "reply", "ok": True}, {"p": x * 2})
    rh, arr = coord.reply_wait(spin=1e-3)
    assert rh["ok"] and np.array_equal(arr["p"], x * 2)
