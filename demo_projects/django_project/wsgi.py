"""WSGI entry point: ``gunicorn demo_projects.django_project.wsgi:application``.

The demo's views are async (for streaming under ASGI); under WSGI Django runs each in
an event loop of its own, and a streamed answer is sent once the provider has finished.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_projects.django_project.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
