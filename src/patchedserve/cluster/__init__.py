"""Many engines and virtual time: the discrete-event simulator and the data-parallel dispatcher.

``simulator.simulate`` replays a trace on N simulated engines (``replica.SimReplica``: the real
scheduling policies on a virtual clock) behind ``dispatch.LeastLoadDispatcher``, with step costs
from profiles (``costs``; image-level costs measured by ``calibrate``). ``sweep`` runs QPS sweeps
and compares them with real replays; ``commands`` is ``patchedserve simulate``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from patchedserve.errors import InvalidRequestError


def load_ray_group() -> ModuleType:
    """``cluster.ray_group`` (which imports Ray); without Ray installed, an ``InvalidRequestError``
    on ``replicas`` that names the extra to install. What ``serve`` and ``bench slo`` call for
    ``--replicas``."""
    try:
        ray_group = importlib.import_module("patchedserve.cluster.ray_group")
    except ImportError as err:
        message = f"--replicas needs Ray ({err}); install it with pip install 'patchedserve[ray]'"
        raise InvalidRequestError(message, "replicas") from err
    return ray_group
