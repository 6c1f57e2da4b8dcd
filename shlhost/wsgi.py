"""WSGI entry point for gunicorn: ``gunicorn shlhost.wsgi:app``."""

from shlhost import create_app

app = create_app()
