"""The sans-I/O core of TaskHub.

Plain Python: no Django, Channels or asyncio imports, and no clock. Callers pass
``now`` (a timezone-aware :class:`datetime.datetime`) into every function that needs
time. The consumer, the services layer and the client are thin wrappers around it.
"""

from __future__ import annotations
