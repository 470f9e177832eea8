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
from engine.connectors.dmp import DmpConnector, DmpDestinationConfig, check_files as dmp_check_files, dmp_targets
from engine.connectors.drimbox import DrimboxConnector, DrimboxDestinationConfig
from engine.connectors.mllp import MLLPConnector, MLLPDestinationConfig, check_tls_files
from engine.connectors.mssante import MssanteConnector, MssanteDestinationConfig, mssante_targets
from engine.connectors.mssante import check_files as mssante_check_files
from engine.connectors.registry import ConnectorType, register
from engine.steps.identity_feed import IdentityFeed
from engine.reports import rules
from engine.reports.processing import CisisReportStep, PacsReportStep
from engine.reports.teleradiology_step import TeleradiologyStep
from engine.transforms import basic, cda_wrap, ins_enrich, validate_specs, wrapped_report  # noqa: F401

TRANSFORM_MODULES = (basic, cda_wrap, ins_enrich, wrapped_report)


def wire() -> None:
    config.set_transform_validator(validate_specs)
    config.set_rule_checker(rules.override_problem)
    register(ConnectorType("mllp", MLLPDestinationConfig, MLLPConnector, check=check_tls_files))
    register(ConnectorType("drimbox", DrimboxDestinationConfig, DrimboxConnector, check=check_tls_files))
    register(ConnectorType("dmp", DmpDestinationConfig, DmpConnector, targets=dmp_targets,
                           check=dmp_check_files))
    register(ConnectorType("mssante", MssanteDestinationConfig, MssanteConnector, mssante_targets,
                           mssante_check_files))


wire()


def channel_steps(cfg, engine_cfg) -> list:
    """The ACK-deciding processing steps enabled on a channel, in the order they are tried
    (first match): identity feed, teleradiology flows, CI-SIS reports, PACS reports."""
    steps = []
    feed_cfg = getattr(cfg, "identity_feed", None)
    if feed_cfg is not None and feed_cfg.enabled:
        steps.append(IdentityFeed(feed_cfg, engine_cfg.environment))
    rep_cfg = getattr(cfg, "reports", None)
    tlr_cfg = getattr(cfg, "teleradiology", None)
    if tlr_cfg is not None and tlr_cfg.enabled:  # before the report steps: see its module docstring
        steps.append(TeleradiologyStep(tlr_cfg, rep_cfg))
    if rep_cfg is not None and rep_cfg.enabled:
        steps.append(CisisReportStep(rep_cfg))
    pacs_cfg = getattr(cfg, "pacs_reports", None)
    if pacs_cfg is not None and pacs_cfg.enabled:
        steps.append(PacsReportStep(pacs_cfg))
    return steps
