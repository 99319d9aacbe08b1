"""What a request handler needs from the node, as dependencies: the database, the spool, the clock."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import Depends, Request

from daemon.service.node import Node
from storage.models import utcnow


def node(request: Request) -> Node:
    value: Node = request.app.state.node
    return value


def now() -> dt.datetime:
    return utcnow()


NodeDep = Annotated[Node, Depends(node)]
Now = Annotated[dt.datetime, Depends(now)]
