"""Registers the schema in Hydra's ConfigStore as ``umm_schema`` (first in conf/config.yaml's defaults)."""
from hydra.core.config_store import ConfigStore

from umm.config.schema import RootConfig

SCHEMA_NAME = "umm_schema"

ConfigStore.instance().store(name=SCHEMA_NAME, node=RootConfig)
