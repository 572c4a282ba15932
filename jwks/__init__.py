"""The tool's own signing keys: generate, rotate, publish as JWKS."""
