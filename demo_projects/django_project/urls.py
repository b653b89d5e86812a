"""The demo's URLs.

    GET  /                 a non-AI page (passes through: no Redis call)
    POST /ai/chat          JSON chat completion via the provider, with fallback
    POST /ai/chat/stream   the same, streamed as server-sent events
    POST /ai/premium/chat  like /ai/chat, on an endpoint that requires quality >= 0.8
    GET  /ai-saas/usage/   the calling tenant's usage this month
"""

from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.home),
    path("ai/chat", views.chat),
    path("ai/chat/stream", views.chat_stream),
    path("ai/premium/chat", views.chat),
    path("ai-saas/", include("ai_saas_middleware.django.urls")),
]
