"""Untrusted files and values: tensors come from safetensors, anything else torch loads is
weights_only, dataset paths stay inside data.root, and no config value ever reaches a shell."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from umm.data.datasets import DataError, Manifest, ManifestError
from umm.train.loop import train

from .conftest import REPO, run_config, umm

SOURCES = [p for d in ("umm", "scripts", "tests") for p in sorted((REPO / d).rglob("*.py"))]


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield f"{path.relative_to(REPO)}:{node.lineno}", owner, name, node


def _keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    bad = []
    for where, owner, name, node in (c for p in SOURCES for c in _calls(p)):
        if owner == "torch" and name == "load":
            value = _keyword(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                bad.append(where)
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_no_shell_anywhere():
    bad = []
    for where, owner, name, node in (c for p in SOURCES for c in _calls(p)):
        shell = _keyword(node, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            bad.append(f"{where} shell=")
        if (owner, name) in {("os", "system"), ("os", "popen"), ("pickle", "load"), ("pickle", "loads")} \
                or (isinstance(node.func, ast.Name) and name in ("eval", "exec")):
            bad.append(f"{where} {owner}.{name}")
        if owner == "subprocess" and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
            bad.append(f"{where} subprocess with a command string")
    assert not bad, bad


class _Payload:
    """Unpickling this creates ``path``: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_is_resumed_without_reading_any_pickle(tmp_path, model_dir, data_root):
    train(run_config(tmp_path / "run", model_dir, data_root, **{"train.max_steps": 2, "train.save_every": 2}))
    ckpt = tmp_path / "run" / "checkpoints" / "0000002"
    kinds = {p.suffix or p.name for p in ckpt.rglob("*") if p.is_file()}
    assert kinds == {".safetensors", ".json", ".yaml", "COMPLETE"}  # tensors in safetensors, the rest text
    marker = tmp_path / "payload-ran"
    for planted in (ckpt / "state" / "rank.rank00000.pt", ckpt / "state" / "optim.pt"):
        torch.save({"data": _Payload(str(marker))}, planted)
    assert train(run_config(tmp_path / "run", model_dir, data_root, **{"train.max_steps": 3}))["step"] == 3
    assert not marker.exists()


def test_export_reads_adapters_from_safetensors_only(tmp_path):
    from umm.export.lora import AdapterError, read_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    marker = tmp_path / "payload-ran"
    torch.save({"w": _Payload(str(marker))}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled adapter files are not loaded"):
        read_adapter(adapter)
    assert not marker.exists()


@pytest.fixture
def outside(tmp_path):
    """A data root with one good image, and a picture outside it."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 0, 0)).save(root / "images" / "in.png")
    Image.new("RGB", (64, 64), (0, 0, 200)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
    return root


@pytest.mark.parametrize("ref", ["../secret.png", "{outside}/secret.png", "images/link.png"])
def test_image_paths_cannot_leave_the_data_root(outside, ref):
    ref = ref.format(outside=outside.parent)
    rows = [{"image": "images/in.png", "caption": "a red square"}, {"image": ref, "caption": "a blue square"}]
    (outside / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = Manifest("t2i", "t2i", "t2i.jsonl", root=str(outside))
    assert manifest.read(0).fields["image"].size == (64, 64)
    with pytest.raises(DataError, match=r"t2i\.jsonl:2: .*resolves outside data.root .*allow_outside_root=true") as err:
        manifest.read(1)
    assert err.value.reason == "outside_root"
    allowed = Manifest("t2i", "t2i", "t2i.jsonl", root=str(outside), allow_outside_root=True)
    assert allowed.read(1).fields["image"].getpixel((0, 0)) == (0, 0, 200)


def test_a_manifest_cannot_leave_the_data_root(outside):
    (outside.parent / "elsewhere.jsonl").write_text(json.dumps({"image": "secret.png", "caption": "a square"}) + "\n")
    with pytest.raises(ManifestError, match=r"data.datasets.t2i.path '../elsewhere.jsonl' resolves outside"):
        Manifest("t2i", "t2i", "../elsewhere.jsonl", root=str(outside))


def test_config_values_reach_a_program_as_plain_arguments(tmp_path):
    script = tmp_path / "show_args.py"
    script.write_text("import json, os, sys\n"
                      "print('ARGS ' + json.dumps([sys.argv[1:], os.environ.get('NOTE')]))\n")
    hostile = "$(touch {0}/a); touch {0}/b `touch {0}/c` | tee {0}/d".format(tmp_path)
    out = umm(["launcher=external", "launcher.entrypoint=python", f"launcher.script={script}",
               f"+launcher.args.note='{hostile}'", f"+launcher.env.NOTE='{hostile}'", f"output_root={tmp_path}"],
              timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ARGS "))
    assert json.loads(line[len("ARGS "):]) == [["--note", hostile], hostile]
    assert not [n for n in "abcd" if (tmp_path / n).exists()]  # no shell ran any of it
