"""Configuration the IDEs of every backend share."""

from __future__ import annotations


def jupyter_server_config(csp: str) -> str:
    """Jupyter's config for a machine: the CSP header, and a lab page that does not carry the
    IDE's token (JupyterLab writes it into the page by default; the proxy adds it to every
    request instead, and without the proxy the login cookie does)."""
    return (
        "c.ServerApp.tornado_settings = {\n"
        f"    'headers': {{'Content-Security-Policy': {csp!r}}},\n"
        "    'page_config_hook': lambda handler, config: {**config, 'token': ''},\n"
        "}\n"
    )
