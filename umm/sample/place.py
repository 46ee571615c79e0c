"""Load a model for inference on one device, or spread over GPUs and host memory with accelerate.

Weights stream from the source one tensor at a time (a LoRA adapter folded in on the way, see
umm/export/source.py) and are cast and moved to their device before the next one is read. With a
device map, the plan comes from accelerate's ``infer_auto_device_map`` (decoder and ViT layers
never split) and ``dispatch_model`` moves activations between devices, as upstream's inferencer
does; the modules whose outputs meet the embedding's outside any module sit with it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from umm.errors import UmmError
from umm.export.source import Source
from umm.model.io import build_on_meta, load_ae, load_dtype, load_tokenizer, materialize_from_state_dict, read_model_dims
from umm.model.sampling import Inferencer

NO_SPLIT = ["MoTDecoderLayer", "SiglipEncoderLayer"]
EMBEDDING = "language_model.model.embed_tokens"
# Their outputs meet the embedding's outside any module: the Euler update and image framing (heads,
# position tables), the final norms (rows put back in sequence order by index tensors made beside
# the embedding), RoPE (angles from those positions).
WITH_EMBEDDING = ("time_embedder", "vae2llm", "llm2vae", "latent_pos_embed", "connector", "vit_pos_embed",
                  "language_model.model.norm", "language_model.model.norm_moe_gen", "language_model.model.rotary_emb")


class PlacementError(UmmError, RuntimeError):
    pass


def device_of(name: str, device_map: Dict[str, object]):
    """The device of a parameter or module: its longest prefix in the map."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise PlacementError(f"the device map places no module holding {name}")
    return device_map[best]


def plan_devices(model: torch.nn.Module, dtype: torch.dtype, max_memory: Optional[Dict] = None) -> Dict[str, object]:
    from accelerate import infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype)
    if "disk" in device_map.values():
        raise PlacementError("the model does not fit the GPUs and host memory (the plan offloads to disk); "
                             "use more GPUs or --dtype bf16")
    first = device_of(EMBEDDING, device_map)
    for name in WITH_EMBEDDING:
        if device_of(name, device_map) != first:  # then the plan has an entry for it or its children
            for k in [k for k in device_map if k.startswith(name + ".")]:
                del device_map[k]
            device_map[name] = first
    return device_map


def load_inferencer(source: Source, weights: str = "ema", *, device: str = "cpu", device_map: Optional[str] = None,
                    dtype: torch.dtype = torch.float32) -> Tuple[Inferencer, Dict[str, object]]:
    """(Inferencer, device map used)."""
    dims = read_model_dims(source.model_dir, source.num_layers)
    model = build_on_meta(dims)
    dmap = plan_devices(model, dtype) if device_map == "auto" else {"": device}
    state = {}
    for key, t in source.tensors(weights):
        state[key] = t.to(device=device_of(key, dmap), dtype=load_dtype(key, dtype, t.dtype)
                          if t.is_floating_point() else t.dtype)
    materialize_from_state_dict(model, state, source=str(source.weight_file(weights)), device=None, dtype=None)
    first = device_of(EMBEDDING, dmap)
    rotary = model.language_model.model.rotary_emb
    rotary.reset_parameters(torch.device(device_of("language_model.model.rotary_emb", dmap)))
    if len(set(map(str, dmap.values()))) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=dmap, main_device=first)
    model.eval()
    ae = load_ae(source.model_dir, device=first, dtype=dtype)
    tokenizer = load_tokenizer(source.model_dir)
    return Inferencer(model, ae, tokenizer.special, tokenizer), dmap
