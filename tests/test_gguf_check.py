"""Issue 17 point 7, targeted cases: a file whose tensors disagree with its metadata, an
unsupported architecture, and a model that does not fit free memory are refused by `dsd plan`,
`dsd doctor --model` and `dsd start` with one line and rc 1, before any worker loads."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

import tests.tiny_moe as tiny_moe
from dsd import cli
from dsd.shard import gguf_check
from dsd.shard.gguf_check import InsufficientMemoryError, ModelFileError, check_memory_fit, check_model
from dsd.shard.gguf_file import open_gguf
from tests.test_robust_gguf_corpus import _regions
from tests.tiny_llama import write_tiny_llama


def _mixtral(path, **kw):
    return tiny_moe.write_tiny_mixtral(path, n_layers=1, D=32, H=2, Hkv=1, F=16, vocab=24, **kw)


def _set_tensor_type(path, name, ggml_type):
    data = bytearray(open(path, "rb").read())
    _, tensors, _ = _regions(bytes(data))
    (tpos,) = [t[3] for t in tensors if t[0] == name]
    struct.pack_into("<I", data, tpos, ggml_type)
    open(path, "wb").write(bytes(data))
    return path


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture
def wrong_norm(tmp_path):
    # I32 has F32's size, so the file stays well formed: before, this loaded and rms_norm failed
    # with a ZeroDivisionError traceback
    return _set_tensor_type(write_tiny_llama(tmp_path / "norm.gguf", n_layers=1, d=32, n_heads=2, n_kv=1,
                                             ffn=32), "blk.0.attn_norm.weight", 26)


@pytest.fixture
def wrong_router(tmp_path, monkeypatch):
    # a router with rows for half the experts: before, it loaded and routed among 4 of 8 experts
    real = tiny_moe.add_weight

    def add(w, name, a, q):
        real(w, name, a[: a.shape[0] // 2] if name.endswith("ffn_gate_inp.weight") else a, q)

    monkeypatch.setattr(tiny_moe, "add_weight", add)
    return _mixtral(tmp_path / "router.gguf", E=8, k=2)


@pytest.fixture
def too_many_used(tmp_path):
    return _mixtral(tmp_path / "used.gguf", E=4, k=5)


@pytest.fixture
def other_arch(tmp_path):
    w = GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(tmp_path / "mamba.gguf")


CASES = [("wrong_norm", "'blk.0.attn_norm.weight' has type I32"),
         ("wrong_router", "'blk.0.ffn_gate_inp.weight' has shape [4, 32], but the metadata implies [8, 32]"),
         ("too_many_used", "'llama.expert_used_count' is 5, expected in 0..4"),
         ("other_arch", "architecture 'mamba' is not supported")]


@pytest.mark.parametrize("fixture,expect", CASES)
def test_plan_and_doctor_refuse(request, capsys, fixture, expect):
    path = request.getfixturevalue(fixture)
    for argv in (["plan", "--model", path, "--nodes", "1"], ["doctor", "--model", path, "--nodes", "1"]):
        rc, err = _cli(capsys, *argv)
        assert rc == 1, (argv, err)
        assert expect in err and "\n" not in err and "Traceback" not in err, err


def test_generate_path_refuses(wrong_norm):
    from dsd.shard.models import build_model

    with open_gguf(wrong_norm) as g, pytest.raises(ModelFileError, match="attn_norm.weight"):
        build_model(g)


def test_start_refuses_before_any_worker(wrong_router, tmp_path):
    # a subprocess as a user runs it: one line on stderr, rc 1, no daemon left behind
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path),
           "DSD_INSTANCE": "gguf-check"}
    r = subprocess.run([sys.executable, "-m", "dsd.cli", "start", "--model", wrong_router, "--nodes", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "ffn_gate_inp.weight" in lines[0] and "starting daemon" not in r.stderr, r.stderr


def test_good_files_pass(tmp_path):
    for p in (write_tiny_llama(tmp_path / "a.gguf"), write_tiny_llama(tmp_path / "b.gguf", tied=True),
              _mixtral(tmp_path / "c.gguf"), tiny_moe.write_tiny_qwen3moe(tmp_path / "d.gguf"),
              tiny_moe.write_tiny_deepseek2(tmp_path / "e.gguf"),
              tiny_moe.write_tiny_deepseek2(tmp_path / "f.gguf", fused_kv_b=True, q_lora=16)):
        with open_gguf(p) as g:
            check_model(g)


def test_memory_fit_trusts_proc_meminfo(tmp_path):
    from dsd.numa.topology import HugePool, NodeInfo, Topology

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 24683772 kB\nMemFree: 23000000 kB\n"
                                           "MemAvailable: 20000000 kB\n")
    # node 0's meminfo under-reads (9.5 GB, as FACTS.md saw on this VM): a warning, not a refusal
    node = NodeInfo(0, (0, 1), 24683772 * 1024, 9_500_000_000, (10,), {"2m": HugePool(2 << 20, 0, 0, 0)}, ())
    topo = Topology(nodes=(node,), thp="madvise", numa_kernel=True)
    warnings = check_memory_fit([15 * 2**30], topo, str(tmp_path))
    assert len(warnings) == 1 and "trusts /proc/meminfo" in warnings[0]
    with pytest.raises(InsufficientMemoryError, match="only 19.07 GiB is available"):
        check_memory_fit([25 * 2**30], topo, str(tmp_path))


def test_plan_refuses_model_that_does_not_fit(tmp_path, capsys, monkeypatch):
    p = write_tiny_llama(tmp_path / "a.gguf")
    monkeypatch.setattr(gguf_check, "_proc_meminfo_kb", lambda root, key: 1)  # 1 KiB available
    rc, err = _cli(capsys, "plan", "--model", p, "--nodes", "1")
    assert rc == 1 and "is available (/proc/meminfo MemAvailable + free hugepages)" in err, err


def test_split_model_passes_and_runs(tmp_path):
    # the layout check works per part (each part's own data section, alignment and end)
    from dsd.shard.gguf_write import write_split_gguf
    from tests.test_robust_gguf_corpus import _run

    src = tiny_moe.write_tiny_deepseek2(tmp_path / "a.gguf")
    with open_gguf(src) as g:
        meta = dict(g.metadata)
        tensors = {n: np.array(t.array()) for n, t in g.tensors.items()}
    paths = write_split_gguf(tmp_path / "s.gguf", meta, tensors, max_tensors_per_part=7)
    assert len(paths) > 2
    with open_gguf(paths[0]) as g:
        check_model(g)
    np.testing.assert_array_equal(_run(src), _run(paths[0]))
