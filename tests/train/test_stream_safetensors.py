"""umm/train/stream_safetensors.py writes files that safetensors itself reads back bitwise: every dtype
a checkpoint holds, strided views, 0-dim and empty tensors, metadata; GPU tensors through the small
bounce buffer, in chunks that cut across elements and tensors."""
import pytest
import torch
from safetensors import safe_open

from umm.train import stream_safetensors
from umm.train.safetensors_file import DTYPE_NAMES
from umm.train.stream_safetensors import StreamWriter, write_tensors


def _tensors(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {f"all/{DTYPE_NAMES[d]}": (torch.randn(7, 5, generator=g) * 100).to(d) for d in DTYPE_NAMES}
    out.update({"strided": torch.randn(6, 4, generator=g).t(), "scalar": torch.tensor(2.5, dtype=torch.float64),
                "empty": torch.empty(0, 3), "bf16_odd": torch.randn(13, generator=g).to(torch.bfloat16)})
    return {k: v.to(device) for k, v in out.items()}


def _read(path) -> tuple:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_safetensors_reads_back_what_was_written(tmp_path):
    tensors = _tensors("cpu")
    write_tensors(tmp_path / "a.safetensors", tensors, {"format": "pt", "note": "{\"json\": 1}"})
    back, meta = _read(tmp_path / "a.safetensors")
    assert meta == {"format": "pt", "note": "{\"json\": 1}"} and set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def test_a_write_out_of_layout_names_what_was_expected(tmp_path):
    layout = {"a": (torch.float32, (2,)), "b": (torch.int64, (3,))}
    with pytest.raises(ValueError, match=r"got b torch.int64 \(3,\), expected a torch.float32 \(2,\)"):
        with StreamWriter(tmp_path / "x.safetensors", layout) as w:
            w.write("b", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="b and maybe more tensors were never written"):
        with StreamWriter(tmp_path / "y.safetensors", layout) as w:
            w.write("a", torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensors_go_through_the_bounce_buffer_in_chunks(tmp_path, monkeypatch):
    # 1,000 bytes a chunk: chunks end inside elements and tensors span several of them.
    monkeypatch.setattr(stream_safetensors, "BOUNCE_BYTES", 1000)
    monkeypatch.setattr(stream_safetensors, "_bounce", None)
    tensors = {**_tensors("cuda"), "big": torch.randn(1000, 3, device="cuda")}
    write_tensors(tmp_path / "g.safetensors", tensors)
    back, _ = _read(tmp_path / "g.safetensors")
    for k, t in tensors.items():
        assert torch.equal(back[k], t.cpu()), k
    assert stream_safetensors._bounce.is_pinned() and stream_safetensors._bounce.numel() == 1000
