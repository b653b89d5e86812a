"""Django settings of the test app (tests/django_app.py). No database: sessions live in
signed cookies, and the users of ``TenantUserBackend`` in memory."""

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
ROOT_URLCONF = "django_app"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "ai_saas_middleware.django",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "ai_saas_middleware.django.AISaaSMiddleware",
]
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
AUTHENTICATION_BACKENDS = ["django_app.TenantUserBackend"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
