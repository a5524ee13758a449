"""weights.HugePageWeights: the single-process default copy of the weights into huge pages is
byte-for-byte the file's tensors, and a model over it computes exactly what the file mapping
gives."""
import numpy as np
from gguf import GGMLQuantizationType as G

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.weights import GGUFWeights, HugePageWeights
from tests.tiny_llama import write_tiny_llama


def test_copy_is_the_files_bytes_and_gives_the_same_logits(tmp_path):
    path = write_tiny_llama(tmp_path / "t.gguf", n_layers=2, qtype=G.Q8_0)
    g = open_gguf(str(path))
    copied, mapped = HugePageWeights(g), GGUFWeights(g)
    for name in g.tensors:
        a, b = copied.raw(name), mapped.raw(name)
        assert a.shape == b.shape and a.ctypes.data != b.ctypes.data
        np.testing.assert_array_equal(a, b)
    assert copied.page_kind() in ("1g", "2m", "thp", "4k", "mixed")
    ids = [1, 5, 9, 3]
    out = []
    for w in (copied, mapped):
        m = build_model(g, weights=w)
        c = m.new_cache(16)
        out.append(np.concatenate([m.forward(Batch.single(c, ids[:3], all_logits=True)),
                                   m.forward(Batch.single(c, ids[3:]))]))
    np.testing.assert_array_equal(out[0], out[1])


def test_engine_weight_modes(tmp_path):
    import pytest

    from dsd.errors import DsdError
    from dsd.shard.engine import Engine

    path = str(write_tiny_llama(tmp_path / "t.gguf", n_layers=1))
    assert Engine(path, weights="mmap").weights is None
    e = Engine(path, weights="copy")
    assert isinstance(e.weights, HugePageWeights) and e.weight_pages != "file mmap (4k)"
    with pytest.raises(DsdError, match="weights="):
        Engine(path, weights="disk")
