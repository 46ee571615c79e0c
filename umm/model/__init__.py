"""BAGEL-compatible unified model (reference/bagel.md): ``bagel.Bagel`` (Qwen2 MoT LLM + SigLIP +
flow-matching bridges), ``attention`` (packed masks, SDPA / flex, KV cache), ``io`` (model dirs),
``parts`` (which part a parameter belongs to), ``autoencoder`` / ``tokenizer`` / ``sampling`` / ``tiny``.

Submodules are imported explicitly (``from umm.model.io import load_model_dir``) to keep this
package import cheap.
"""
