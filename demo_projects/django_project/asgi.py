"""ASGI entry point: ``uvicorn demo_projects.django_project.asgi:application``."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout, where demo_projects/ lives
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_projects.django_project.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()
