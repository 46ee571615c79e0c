"""``umm data check``: every row of every dataset through the trainer's own reading and planning.

Each bad row is printed as ``<file>:<line>: <what is wrong>`` (parquet ``<file>:row<N>``, tar
``<shard>:<member>``) the moment it is found; then per dataset: rows, token-length percentiles, the
share of samples over ``data.max_num_tokens_per_sample``, images per sample and the image sizes after
the transforms; then the bad rows counted per reason. Returns 1 when anything is bad.

A row is planned as in epoch 0 (its random draws: caption, edit span, cfg dropout), so token counts
are those of one real draw. Parts that upstream drops with a warning (an IRG image that does not
decode) are listed as warnings: the row still trains.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, TextIO

import numpy as np

from umm.config.schema import RootConfig
from umm.data.datasets import DataError
from umm.data.plan import ImageItem
from umm.datatool.build import DataToolError, Parts

PERCENTILES = (50, 90, 99)


@dataclass
class DatasetReport:
    name: str
    kind: str
    where: str = ""
    rows: int = 0
    bad: int = 0
    error: Optional[str] = None  # the dataset as a whole cannot be read
    tokens: List[int] = field(default_factory=list)
    images: List[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)  # (role, "WxH") -> images
    over_limit: int = 0


class _Warnings(logging.Handler):
    """Collects what the data layer logs while one row is read (parts dropped as upstream drops them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, source: str) -> List[str]:
        """Each as ``<file>:<line>: warning: ...``; a dropped part's own error names the row already."""
        lines = []
        for record in self.records:
            err = next((arg for arg in record.args or () if isinstance(arg, DataError)), None)
            lines.append(f"{err.source}: warning: {err.message} (dropped, as upstream drops it)" if err is not None
                         and err.message else f"{source}: warning: {record.getMessage()}")
        self.records.clear()
        return lines


def _check_dataset(parts: Parts, name: str, out: TextIO, reasons: Counter, warnings: Counter) -> DatasetReport:
    data = parts.cfg.data
    spec = data.datasets[name]
    report = DatasetReport(name, spec.kind)
    try:
        source = parts.source(name)
    except DataToolError as exc:
        report.error = str(exc)
        reasons["unreadable_dataset"] += 1
        where = f"data.datasets.{name}"
        print(exc if str(exc).startswith(where) else f"{where}: {exc}", file=out, flush=True)
        return report
    manifest = source.manifests[name]
    report.where = f"{manifest.reader.format} {manifest.path}"
    report.rows = len(manifest)
    limit = data.max_num_tokens_per_sample
    handler = _Warnings()
    logger = logging.getLogger("umm.data")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # listed below instead of logged twice
    try:
        for row in range(report.rows):
            try:
                sample = source.planned((name, 0, row))
            except DataError as exc:
                report.bad += 1
                reasons[exc.reason] += 1
                print(f"{exc.source}: {exc.message or exc}", file=out, flush=True)
                continue
            finally:
                for line in handler.lines(manifest.source(row)):
                    warnings["dropped_part"] += 1
                    print(line, file=out, flush=True)
            if sample.num_tokens > limit:
                report.bad += 1
                report.over_limit += 1
                reasons["too_long"] += 1
                print(f"{manifest.source(row)}: sample has {sample.num_tokens} tokens, over "
                      f"data.max_num_tokens_per_sample={limit}", file=out, flush=True)
            report.tokens.append(sample.num_tokens)
            images = [item for item in sample.plan.items if isinstance(item, ImageItem)]
            report.images.append(len(images))
            report.sizes.update((item.role, f"{item.image.shape[-1]}x{item.image.shape[-2]}") for item in images)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return report


def _summary(report: DatasetReport, limit: int) -> List[str]:
    head = f"{report.name} (kind {report.kind}"
    if report.error is not None:
        return [f"{head}): cannot be read"]
    lines = [f"{head}, {report.where}): {report.rows} rows, {report.rows - report.bad} ok, {report.bad} bad"]
    if report.tokens:
        tokens = np.asarray(report.tokens)
        pcts = ", ".join(f"p{p} {int(np.percentile(tokens, p, method='lower'))}" for p in PERCENTILES)
        lines.append(f"  tokens per sample: min {tokens.min()}, {pcts}, max {tokens.max()}; over "
                     f"max_num_tokens_per_sample ({limit}): {100 * report.over_limit / len(tokens):.1f}%")
        images = np.asarray(report.images)
        lines.append(f"  images in the sequence per sample: min {images.min()}, mean {images.mean():.2f}, "
                     f"max {images.max()}")
        sizes = ", ".join(f"{role} {size} ({n})" for (role, size), n in sorted(report.sizes.items()))
        lines.append(f"  image sizes after transform: {sizes or 'none'}")
    return lines


def run_check(cfg: RootConfig, out: Optional[TextIO] = None) -> int:
    import sys

    out = out or sys.stdout
    data = cfg.data
    print(f"umm data check: recipe {cfg.method.recipe}, data {data.name} (root {data.root}), "
          f"{len(data.datasets)} dataset{'s' * (len(data.datasets) != 1)}; tokens per batch {data.expected_num_tokens} (max {data.max_num_tokens}), "
          f"per sample at most {data.max_num_tokens_per_sample}", file=out, flush=True)
    if not data.datasets:
        raise DataToolError(f"data config {data.name!r} lists no datasets (data.datasets is empty)")
    parts = Parts(cfg)
    reasons: Counter = Counter()
    warnings: Counter = Counter()
    reports: Dict[str, DatasetReport] = {}
    for name in data.datasets:
        reports[name] = _check_dataset(parts, name, out, reasons, warnings)
    print("", file=out)
    for report in reports.values():
        print("\n".join(_summary(report, data.max_num_tokens_per_sample)), file=out)
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
    if warnings:
        print(f"warnings: {sum(warnings.values())} ({', '.join(f'{k} {n}' for k, n in sorted(warnings.items()))})",
              file=out)
    rows = sum(r.rows for r in reports.values())
    if reasons:
        print(f"umm data check: {sum(reasons.values())} problems in {rows} rows ({counts})", file=out, flush=True)
        return 1
    print(f"umm data check: OK, {rows} rows in {len(reports)} dataset{'s' * (len(reports) != 1)}", file=out,
          flush=True)
    return 0
