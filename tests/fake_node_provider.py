"""The autoscaler's node provider for tests: Ray's fake multi-node provider, which starts each worker node
as raylet processes on this machine, plus what it lacks: a node type's `memory`.

Ray's provider passes a node type's resources other than CPU, GPU and object_store_memory to the new raylet
as custom resources, and Ray refuses `memory` there; the autoscaler, meanwhile, plans with whatever the node
type declares. A node type here may declare `memory` (bytes), as KubeRay's does from the pod's limits: it is
handed to the raylet as its memory, so the autoscaler and the node agree.
Loaded by the head's autoscaler (`provider: {type: external, module: fake_node_provider.MemoryFakeProvider}`).
"""

from __future__ import annotations

import json

import ray
from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

_RayParams = ray._private.parameter.RayParams


def _params_with_memory(*args, resources=None, env_vars=None, **kwargs):
    resources = dict(resources or {})
    memory = resources.pop("memory", None)
    env_vars = dict(env_vars or {})
    if ray_constants.RESOURCES_ENVIRONMENT_VARIABLE in env_vars:
        env_vars[ray_constants.RESOURCES_ENVIRONMENT_VARIABLE] = json.dumps(resources)
    return _RayParams(*args, resources=resources, memory=memory, env_vars=env_vars, **kwargs)


class MemoryFakeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        ray._private.parameter.RayParams = _params_with_memory
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            ray._private.parameter.RayParams = _RayParams
