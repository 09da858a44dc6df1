"""``python -m services.gateway``: the HTTP gateway under uvicorn (SIGTERM: uvicorn drains its connections)."""

from __future__ import annotations


def main() -> None:
    import uvicorn

    from services.gateway.app import create_app
    from services.gateway.config import GatewaySettings
    from shared.contracts import Names
    from shared.runtime import prom
    from shared.runtime.logging import configure_logging
    from shared.runtime.runner import tune_process

    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level, settings.log_format, settings.log_content)
    tune_process(settings)
    with prom.metrics_endpoint(settings.metrics_port, settings.metrics_host, settings.redis_url, Names.from_env(),
                     cluster=settings.redis_cluster):
        uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                    log_level="warning", timeout_graceful_shutdown=int(settings.shutdown_grace_s))
