from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("taskhub/", include("taskhub.urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
