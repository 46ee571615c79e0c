"""RowReader.read_into, the read under every weight load: any rows of any tensor of a safetensors file,
into a tensor of another dtype or on a GPU, equal to what safetensors' own loader gives (sliced and
converted by torch)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.train import materialize
from umm.train.materialize import RowReader

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture
def weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(37, 5, 3, generator=gen).to(torch.bfloat16),
        "fp32": torch.randn(11, 7, generator=gen),
        "int64": torch.randint(-(2**40), 2**40, (9,), generator=gen),
        "bool": torch.rand(6, 4, generator=gen) > 0.5,
        "scalar": torch.tensor(3.25),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key,start,stop,dtype", [
    ("bf16", 0, 37, torch.bfloat16), ("bf16", 5, 30, torch.float32), ("fp32", 3, 11, torch.bfloat16),
    ("fp32", 0, 11, torch.float32), ("int64", 2, 7, torch.int64), ("bool", 1, 5, torch.bool),
    ("scalar", 0, 0, torch.float32), ("fp32", 4, 4, torch.float32),
])
def test_rows_read_into_any_dtype_and_device_equal_safetensors_own(weights, monkeypatch, device, key, start,
                                                                   stop, dtype):
    monkeypatch.setattr(materialize, "STAGING_BYTES", 64)  # several chunks through both halves on a GPU
    want = load_file(str(weights))[key]
    want = want if key == "scalar" else want[start:stop]
    out = torch.full(want.shape, 7, dtype=dtype, device=device)  # poisoned: every element must be written
    with RowReader(weights) as reader:
        n = reader.read_into(key, start, stop, out)
        host = reader.rows(key, start, stop)
    assert n == want.numel() * want.element_size()
    assert torch.equal(out.cpu(), want.to(dtype)) and torch.equal(host, want) and host.dtype == want.dtype


def test_a_tensor_that_does_not_fit_the_rows_is_refused(weights):
    with RowReader(weights) as reader, pytest.raises(ValueError, match="fp32 rows 0..3 do not fit"):
        reader.read_into("fp32", 0, 3, torch.empty(3, 6))
