"""Names the config layer checks choices against, kept here so that validating a config imports
nothing above it: the registries (umm/pipelines, umm/methods) map these names to code and check at
import that they cover exactly these."""
from __future__ import annotations

# pipeline.name: bagel, recA and unicot share the plain launch; irg runs its stages (umm/pipelines).
PIPELINE_NAMES = ("bagel", "recA", "unicot", "irg")

# method.recipe: one module per recipe under umm/methods.
RECIPE_NAMES = ("sft", "reca", "unicot", "irg")
