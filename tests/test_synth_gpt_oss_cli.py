"""`dsd synth --arch gpt-oss`: the file it writes loads (gguf_check via build_model) and runs a
forward; flags take the arch's defaults (gpt_oss_spec()) unless given, and the other
architecture's flags are refused."""
from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.commands import synth as synth_cmd
from dsd.errors import DsdError
from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.synth import SynthSpec, gpt_oss_spec
from tests.test_daemon_util import REPO


def _parse(*argv):
    p = argparse.ArgumentParser()
    synth_cmd.add_arguments(p)
    return p.parse_args(["out.gguf", *argv])


def test_spec_from_args_defaults_per_arch():
    assert synth_cmd.spec_from_args(_parse()) == SynthSpec()
    assert synth_cmd.spec_from_args(_parse("--arch", "gpt-oss")) == gpt_oss_spec()
    s = synth_cmd.spec_from_args(_parse("--arch", "gpt-oss", "--type", "q4_0", "--layers", "3", "--no-yarn"))
    assert (s.arch, s.qtype, s.expert_type, s.layers, s.yarn_factor) == ("gpt-oss", "Q4_0", "MXFP4", 3, 1.0)
    with pytest.raises(DsdError, match="--kv-lora does not apply to --arch gpt-oss"):
        synth_cmd.spec_from_args(_parse("--arch", "gpt-oss", "--kv-lora", "64"))
    with pytest.raises(DsdError, match="--sliding-window does not apply to --arch deepseek2"):
        synth_cmd.spec_from_args(_parse("--sliding-window", "64"))
    with pytest.raises(DsdError, match="kv-heads"):
        synth_cmd.spec_from_args(_parse("--arch", "gpt-oss", "--heads", "8", "--kv-heads", "3"))


def test_synth_cli_gpt_oss_runs(tmp_path):
    out = tmp_path / "goss.gguf"
    r = subprocess.run([sys.executable, "-m", "dsd.cli", "synth", str(out), "--arch", "gpt-oss", "--layers", "2",
                        "--hidden", "256", "--heads", "8", "--kv-heads", "2", "--experts", "8", "--experts-used", "4",
                        "--expert-ffn", "128", "--sliding-window", "4"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "gpt-oss, 2 layers, Q8_0 (experts MXFP4)" in r.stdout
    with open_gguf(str(out)) as g:
        assert g.architecture == "gpt-oss"
        assert g.tensors["blk.0.ffn_gate_exps.weight"].ggml_type == Q.MXFP4
        assert g.tensors["blk.1.attn_q.weight"].ggml_type == Q.Q8_0
        assert g.tensors["blk.0.ffn_down_exps.bias"].shape == (8, 256)
        m = build_model(g)
        assert [a.window for a in m.attn] == [4, 0] and m.args.n_experts == 8 and m.args.n_kv_heads == 2
        logits = m.forward(Batch.single(m.new_cache(16), [1, 2, 3, 4, 5, 6]))
    assert logits.shape == (1, 49152) and np.isfinite(logits).all()
