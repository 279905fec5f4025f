"""HTTP routes of the app; mount them in your project's URLconf under ``taskhub/``:
``path("taskhub/", include("taskhub.urls"))``."""

from __future__ import annotations

from django.urls import path

from . import metrics, views

app_name = "taskhub"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("metrics", metrics.view, name="metrics"),
]
