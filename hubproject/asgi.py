"""ASGI entry point: ``daphne hubproject.asgi:application``.

HTTP goes to Django (admin); WebSockets at ``/ws/taskhub/`` go to the hub. The hub's
sweeper starts with the server (:mod:`taskhub.asgi`).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hubproject.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from taskhub.asgi import hub_application  # noqa: E402
from taskhub.routing import websocket_urlpatterns  # noqa: E402
from taskhub.security import BrowserOriginValidator  # noqa: E402

application = hub_application(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns)),
        }
    )
)
