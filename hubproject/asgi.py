"""ASGI entry point: ``daphne hubproject.asgi:application``.

HTTP goes to Django (admin, the dashboard at ``/taskhub/``); WebSockets at
``/ws/taskhub/`` go to the hub. The hub's sweeper starts with the server
(:mod:`taskhub.asgi`).

WebSockets pass Channels' ``AuthMiddlewareStack``, inside the ``Origin`` check: it reads
the Django session of a browser's handshake, from which the dashboard's monitor rights
come (a staff user). Services authenticate with their key and carry no session cookie
and no ``Origin``: :class:`~taskhub.routing.ServiceHandshakes` takes their handshakes
straight to the hub.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hubproject.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from taskhub.asgi import hub_application  # noqa: E402
from taskhub.routing import ServiceHandshakes, websocket_urlpatterns  # noqa: E402
from taskhub.security import BrowserOriginValidator  # noqa: E402

application = hub_application(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            # The Origin check first: a foreign page cannot ride on an operator's session.
            "websocket": ServiceHandshakes(
                BrowserOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
            ),
        }
    )
)
