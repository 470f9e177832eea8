"""The one place where plug-ins are wired: connector types (and their routes.yaml models).

Imported by the entry points (``engine.app``, ``engine.cli``) before any configuration is read.
Adding a connector: write its module under ``engine/connectors/`` (config model, factory,
optional targets) and add one ``register`` line here.
"""
from __future__ import annotations

from engine.connectors.drimbox import DrimboxConnector, DrimboxDestinationConfig
from engine.connectors.mllp import MLLPConnector, MLLPDestinationConfig
from engine.connectors.registry import ConnectorType, register


def wire() -> None:
    register(ConnectorType("mllp", MLLPDestinationConfig, MLLPConnector))
    register(ConnectorType("drimbox", DrimboxDestinationConfig, DrimboxConnector))


wire()
