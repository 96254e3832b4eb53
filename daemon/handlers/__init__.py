"""HTTP handlers, thin by design: parse and check the request, call a service, shape the answer.

* :mod:`~daemon.handlers.management`: the operator's management API (the seed's operations and
  the channel-sharing extension).
* :mod:`~daemon.handlers.transport`: the token-authenticated endpoints peers call.
* :mod:`~daemon.handlers.health`: ``/healthz``.
* :mod:`~daemon.handlers.common`: body reading with a cap, JSON answers, query parameters.
"""
