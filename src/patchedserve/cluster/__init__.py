"""Many engines and virtual time: the discrete-event simulator and the data-parallel dispatcher.

``simulator.simulate`` replays a trace on N simulated engines (``replica.SimReplica``: the real
scheduling policies on a virtual clock) behind ``dispatch.LeastLoadDispatcher``, with step costs
from profiles (``costs``; image-level costs measured by ``calibrate``). ``sweep`` runs QPS sweeps
and compares them with real replays; ``commands`` is ``patchedserve simulate``.
"""
