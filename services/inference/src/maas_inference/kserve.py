"""The KServe-v2 views of deployments: model config, statistics and the repository index.

Transport-free. To a KServe-v2 client every deployment is one model under the deployment's
id, whatever Triton models (canary versions, a shadow) serve it: its config is the Triton
config of the version it serves first, renamed; its statistics are the sums over every Triton
model behind it; the repository index lists the deployments the token may see. What a token
may see is decided by `maas_runtime.scopes`, through `_visible_routes` only.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message
from maas_runtime import errors, scopes
from maas_runtime.auth import Principal
from tritonclient.grpc import model_config_pb2, service_pb2

from maas_inference.controller import (
    CREATING,
    READY,
    ROLLING_OUT,
    DeploymentController,
)
from maas_inference.routing import Route, RouteTable
from maas_inference.triton.client import TritonClient

_INDEX_STATES = {READY: "READY", ROLLING_OUT: "READY", CREATING: "LOADING"}
"""Deployment state → Triton's model states; anything else is UNAVAILABLE."""


class KServeViews:
    """ModelConfig, ModelStatistics and RepositoryIndex answered for deployments."""

    def __init__(self, controller: DeploymentController, routes: RouteTable,
                 triton: Callable[[], TritonClient]) -> None:
        self._controller = controller
        self._routes = routes
        self._triton = triton

    async def model_config(self, deployment_id: str,
                           principal: Principal) -> model_config_pb2.ModelConfig:
        route = self._routes.served(deployment_id, principal).route
        config = await self._triton().model_config(route.targets[0][0].triton_model)
        config.name = deployment_id
        return config

    async def model_statistics(self, deployment_id: str, principal: Principal
                               ) -> list[service_pb2.ModelStatistics]:
        """One entry per deployment (`deployment_id`, or every loaded one the token may see
        when it is empty), summed over the Triton models behind it."""
        if deployment_id:
            routes = {deployment_id: self._routes.served(deployment_id, principal).route}
        else:
            routes = _visible_routes(principal, self._routes.routes())
        statistics = []
        for name, route in sorted(routes.items()):
            total = service_pb2.ModelStatistics(name=name)
            for triton_model in sorted(route.models):
                response = await self._triton().model_statistics(triton_model)
                for part in response.model_stats:
                    _add_statistics(total, part)
            statistics.append(total)
        return statistics

    async def repository_index(self, repository_name: str, ready_only: bool,
                               principal: Principal
                               ) -> list[service_pb2.RepositoryIndexResponse.ModelIndex]:
        if repository_name:
            raise errors.InvalidArgument.for_field(
                "repository_name", "the gateway serves one repository, its deployments: "
                "leave the name empty")
        index = []
        for deployment in await self._controller.visible(principal):
            state = _INDEX_STATES.get(deployment["state"], "UNAVAILABLE")
            if ready_only and state != "READY":
                continue
            index.append(service_pb2.RepositoryIndexResponse.ModelIndex(
                name=deployment["name"].removeprefix("deployments/"), state=state,
                reason=deployment.get("message", "")))
        return index


def _route_model_ids(route: Route) -> set[str]:
    models = [model for model, _ in route.targets]
    if route.shadow is not None:
        models.append(route.shadow)
    return {model.version.split("/")[1] for model in models}


def _visible_routes(principal: Principal, routes: dict[str, Route]) -> dict[str, Route]:
    """The routes whose every model the token may see (the one scope filter of this module)."""
    visible = scopes.visible(principal, routes.items(), lambda item: _route_model_ids(item[1]))
    return dict(visible)


def _add_statistics(total: service_pb2.ModelStatistics, part: service_pb2.ModelStatistics
                    ) -> None:
    """Add one Triton model's statistics into a deployment's: counts and durations summed,
    batch statistics per batch size, the latest inference kept."""
    total.last_inference = max(total.last_inference, part.last_inference)
    total.inference_count += part.inference_count
    total.execution_count += part.execution_count
    _add_counters(total.inference_stats, part.inference_stats)
    by_size = {batch.batch_size: batch for batch in total.batch_stats}
    for batch in part.batch_stats:
        into = by_size.get(batch.batch_size)
        if into is None:
            into = by_size[batch.batch_size] = total.batch_stats.add(batch_size=batch.batch_size)
        _add_counters(into, batch, skip=("batch_size",))
    for key, response_stats in part.response_stats.items():
        _add_counters(total.response_stats[key], response_stats)


def _add_counters(total: Message, part: Message, skip: tuple[str, ...] = ()) -> None:
    """Sum every integer of `part` into `total`, through nested messages (the
    `StatisticDuration` counts and nanoseconds)."""
    for field, value in part.ListFields():
        if field.name in skip:
            continue
        if field.message_type is not None:
            _add_counters(getattr(total, field.name), value)
        else:
            setattr(total, field.name, getattr(total, field.name) + value)
