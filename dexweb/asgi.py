"""The ASGI application daphne serves: Django for HTTP, Channels for the dashboard's websockets.

Websockets check the Origin against ALLOWED_HOSTS (no cross-site socket hijacking with the session cookie)
and carry the session user; each consumer refuses anonymous users itself.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dexweb.settings")
# Set Django up (apps, models) before anything imports the consumers.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from runs.web.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Static files are served by WhiteNoise's middleware, DEBUG or not (see settings).
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
