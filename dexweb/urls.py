from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from runs.api import sse
from runs.api.views import api
from runs.ops.metrics import metrics_view


# CSRF protects cookie sessions; nothing under /api/ authenticates with one (a Bearer key can't be forged by
# another site), and a CSRF check here would answer an API client with Django's HTML 403 page.
@csrf_exempt
def api_not_found(request: HttpRequest) -> JsonResponse:
    """Anything under /api/ that no endpoint serves is a JSON 404 too, not an HTML page (whatever DEBUG says)."""
    message = f"no API endpoint at {request.path}; see /api/docs"
    return JsonResponse({"error": {"code": "not_found", "message": message}}, status=404)


# The dashboard's own error pages (runs/web/errors.py; with DEBUG on, its middleware stands in for these).
handler400 = "runs.web.errors.bad_request"
handler403 = "runs.web.errors.permission_denied"
handler404 = "runs.web.errors.page_not_found"
handler500 = "runs.web.errors.server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    # Server-sent events are a streaming async view, outside django-ninja (which renders whole responses).
    path("api/runs/<uuid:run_id>/stream", csrf_exempt(sse.run_stream), name="api-run-stream"),
    path("api/", api.urls),
    re_path(r"^api/", api_not_found),
    path("", include("runs.web.urls")),
]
