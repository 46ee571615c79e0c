"""What a training run builds for its data, without the model: tokenizer, recipe, sample sources.

Each piece comes from the trainer's own code (umm/train/loop.py, umm/data/loader.py), so the rows,
plans and token counts seen here are the ones training would see. Setup mistakes become one
``DataToolError`` line.
"""
from __future__ import annotations

import dataclasses

from umm.config.schema import RootConfig
from umm.data.loader import PlanStream, SampleSource, StreamSpec, check_geometry, geometry_from_config
from umm.data.outdir import read_marker
from umm.errors import UmmError

# One data stream reads every row: the view of a single-process run (more ranks or workers split
# the rows between them, each sample stays the same: umm/data/mix.py).
ONE_STREAM = StreamSpec(stream=0, num_streams=1)


class DataToolError(UmmError):
    """The data (or the config that points at it) cannot be read; the message says what to fix."""


class Parts:
    """The tokenizer (only: no weights), recipe and geometry check of ``cfg``."""

    def __init__(self, cfg: RootConfig):
        from umm.methods import get_recipe
        from umm.model.tokenizer import load_tokenizer

        self.cfg = cfg
        try:
            check_geometry(cfg.data, geometry_from_config(cfg))
            self.recipe = get_recipe(cfg.method)
        except ValueError as exc:
            raise DataToolError(str(exc)) from None
        self.tokenizer = load_tokenizer(cfg.model.path)

    def source(self, name: str) -> SampleSource:
        """The sample source of dataset ``name`` alone, so each dataset's problems are reported apart."""
        data = self.cfg.data
        one = dataclasses.replace(data, datasets={name: data.datasets[name]})
        return _wrapped(lambda: SampleSource(one, self.recipe, self.tokenizer, ONE_STREAM), data)

    def plan_stream(self) -> PlanStream:
        """Batches of the whole mix, as the one stream of a single-process run draws them."""
        return _wrapped(lambda: PlanStream(self.cfg.data, self.recipe, self.tokenizer, ONE_STREAM), self.cfg.data)


def _wrapped(build, data):
    try:
        return build()
    except (UmmError, ValueError) as exc:  # the loader reports config mistakes as ValueError
        message = str(exc)
        if data.synthesize and read_marker(data.root) is None:
            message += f" (data.synthesize=true: {data.root} has no synthetic data yet; a training run writes it first)"
        raise DataToolError(message) from None
