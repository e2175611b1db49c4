"""Mandate for agents over HTTP: an ``httpx.Auth`` that sends the chain and a
fresh PoP with every request. Needs ``httpx``; works with ``httpx.Client``
and ``httpx.AsyncClient``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import httpx

from .._holder import Holder
from ._common import HttpCall, HttpRequestMapper

__all__ = ["MandateAuth", "http_call"]


def http_call(request: httpx.Request, *, with_body: bool) -> HttpCall:
    """The HttpCall a service's MandateMiddleware will see for ``request``."""
    return HttpCall.build(request.method, request.url.path, request.url.query,
                          request.headers.multi_items(),
                          request.content if with_body else None)


class MandateAuth(httpx.Auth):
    """Sets ``Authorization: Mandate <chain>`` and ``Mandate-PoP`` per request.

    ``to_request`` should be the very mapper the service gives its
    MandateMiddleware (with the same ``read_body``), so both sides hash the
    same Request into the PoP.
    """

    def __init__(self, holder: Holder, chain: str, to_request: HttpRequestMapper, *,
                 aud: str, read_body: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self._holder = holder
        self._chain = chain
        self._to_request = to_request
        self._aud = aud
        self._read_body = read_body
        self._clock = clock
        self.requires_request_body = read_body  # httpx reads a streamed body first

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        mandate_request = self._to_request(http_call(request, with_body=self._read_body))
        pop = self._holder.prove(self._chain, mandate_request, aud=self._aud, now=self._clock())
        request.headers["Authorization"] = "Mandate " + self._chain
        request.headers["Mandate-PoP"] = pop
        yield request
