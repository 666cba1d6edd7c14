"""The request gateway: one OpenAI-compatible endpoint in front of several replicas.

- ``pool``: the replicas, their health and the latencies the gateway learns from them.
- ``app``: the HTTP API (validate, route with :mod:`collm_fl.policies.routing`, forward, fail over).
- ``proxy``: routing, forwarding and failover; ``sse``: the events of a relayed stream.
- ``serve``: run it with uvicorn.

Import the submodules directly; the gateway never loads torch or a model.
"""
