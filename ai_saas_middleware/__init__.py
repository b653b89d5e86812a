"""ai_saas_middleware: every AI request of a SaaS web app, cost-aware.

The core is framework-free; adapters live in ``ai_saas_middleware.starlette``
(``.asgi``), and are imported only by apps that use them::

    from ai_saas_middleware import AsyncGateway, Gateway, load_config
    gateway = Gateway(load_config("ai-saas-config.yaml"))
    with gateway.request(tenant_id="acme", endpoint="/ai/chat") as ctx:
        ...
"""

from __future__ import annotations

from .config import Config, ModelProfile, load_config
from .context import RequestContext, Ticket
from .errors import (
    AISaaSError,
    BudgetExceeded,
    ConfigError,
    ConfigProblem,
    LimitExceeded,
    NoEligibleModel,
    NoHealthyModel,
    QuotaExceeded,
    RateLimited,
    RequestRefused,
    StoreError,
    StoreRefused,
    UnknownTenant,
)
from .gateway import AsyncGateway, Gateway
from .types import Decision, Outcome, RequestInfo, Usage
from .usage import ResponseMeter

__version__ = "0.1.0"

__all__ = [
    "AISaaSError",
    "AsyncGateway",
    "BudgetExceeded",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Decision",
    "Gateway",
    "LimitExceeded",
    "ModelProfile",
    "NoEligibleModel",
    "NoHealthyModel",
    "Outcome",
    "QuotaExceeded",
    "RateLimited",
    "RequestContext",
    "RequestInfo",
    "RequestRefused",
    "ResponseMeter",
    "StoreError",
    "StoreRefused",
    "Ticket",
    "UnknownTenant",
    "Usage",
    "load_config",
]
