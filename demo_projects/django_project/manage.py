#!/usr/bin/env python
"""Django's command line for the demo: ``python demo_projects/django_project/manage.py check``."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    ROOT = Path(__file__).resolve().parents[2]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_projects.django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
