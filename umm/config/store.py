"""Registers what Hydra composes with: the schema in Hydra's ConfigStore as ``umm_schema`` (first in
conf/config.yaml's defaults) and the ``umm.job_dir`` resolver that names a multirun job's directory
(umm/config/jobdir.py)."""
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from umm.config.jobdir import job_dirname
from umm.config.schema import RootConfig

SCHEMA_NAME = "umm_schema"

_schema = OmegaConf.structured(RootConfig)
# data.datasets takes new names without `+` (`data.datasets={mine: {...}}`, `data.datasets.mine.path=...`):
# it is the user's list of datasets, not a fixed set of keys.
OmegaConf.set_struct(_schema.data.datasets, False)
ConfigStore.instance().store(name=SCHEMA_NAME, node=_schema)
OmegaConf.register_new_resolver("umm.job_dir", job_dirname, replace=True)
