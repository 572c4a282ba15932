"""gunicorn entry point: `gunicorn wsgi:app`."""

from lti_tool.web.app import create_app

app = create_app()
