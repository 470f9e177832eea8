"""The one place where plug-ins are wired: transforms, connector types (with their routes.yaml
models) and the processing steps of channels.

Imported by the entry points (``engine.app``, ``engine.cli``, the benchmarks) before any
configuration is read; nothing below imports it back. Adding a connector: write its module under
``engine/connectors/`` (config model, factory, optional targets) and add one ``register`` line
here; a transform: its module under ``engine/transforms/`` registers itself with
``@register`` when imported here.
"""
from __future__ import annotations

from engine import config
from engine.connectors.drimbox import DrimboxConnector, DrimboxDestinationConfig
from engine.connectors.mllp import MLLPConnector, MLLPDestinationConfig
from engine.connectors.registry import ConnectorType, register
from engine.transforms import basic, cda_wrap, ins_enrich, validate_specs, wrapped_report  # noqa: F401

TRANSFORM_MODULES = (basic, cda_wrap, ins_enrich, wrapped_report)


def wire() -> None:
    config.set_transform_validator(validate_specs)
    register(ConnectorType("mllp", MLLPDestinationConfig, MLLPConnector))
    register(ConnectorType("drimbox", DrimboxDestinationConfig, DrimboxConnector))


wire()
