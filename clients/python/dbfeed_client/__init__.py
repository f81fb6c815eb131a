"""dbfeed-client: subscriptions to a dbfeed server that resume by themselves and keep rows live.

    async with FeedClient("http://127.0.0.1:8000", token=token) as feed:
        async with feed.subscribe("main:public.orders", snapshot=True) as sub:
            async for change in sub:
                print(change["op"], change["key"], len(sub.rows))

See docs/clients.md in the dbfeed repository.
"""

from dbfeed_client.client import FeedClient, State, Subscription, Token
from dbfeed_client.errors import (
    ClosedError,
    ConnectError,
    FeedError,
    RequestTimeout,
    SubscribeError,
)
from dbfeed_client.rows import key_text

__all__ = [
    "ClosedError",
    "ConnectError",
    "FeedClient",
    "FeedError",
    "RequestTimeout",
    "State",
    "SubscribeError",
    "Subscription",
    "Token",
    "key_text",
]
