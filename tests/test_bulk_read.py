"""spatial/bulk_read.py: a safetensors file read in chunks equals safetensors' own reader, tensor by tensor, for
every dtype the format holds and every chunk boundary; a truncated or foreign file is an error naming it."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlnflow.errors import UserError
from vlnflow.spatial.bulk_read import load_to_device


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "aggregator.blocks.0.w": torch.randn(37, 11, generator=g),
        "aggregator.blocks.0.b": torch.randn(11, generator=g).to(torch.bfloat16),
        "aggregator.h": torch.randn(3, 5, generator=g).half(),
        "aggregator.d": torch.randn(7, generator=g).double(),
        "aggregator.i": torch.arange(13, dtype=torch.int64),
        "aggregator.m": torch.tensor([True, False, True]),
        "aggregator.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_chunks_give_safetensors_own_tensors(weights, chunk):
    want = load_file(str(weights))
    got = load_to_device(weights, torch.device("cpu"), chunk_bytes=chunk)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor), name


def test_bulk_reader_equals_the_cpu_reader_of_open_tensors(weights):
    """open_tensors reads safetensors in bulk for a GPU and with safe_open on the CPU: the same shapes and values."""
    from vlnflow.spatial import checkpoint

    bulk = load_to_device(weights, torch.device("cpu"))
    with checkpoint.open_tensors(weights) as (shapes, read):
        assert shapes == {k: tuple(v.shape) for k, v in bulk.items()}
        assert all(torch.equal(read(k), v) for k, v in bulk.items())


def test_truncated_or_foreign_file_is_named(weights, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-9])
    with pytest.raises(UserError, match="cut.safetensors: truncated"):
        load_to_device(cut, torch.device("cpu"))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nojson")
    with pytest.raises(UserError, match="other.safetensors: not a safetensors file"):
        load_to_device(other, torch.device("cpu"))
