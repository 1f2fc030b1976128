"""Thin Ray Serve deployment classes over serve_app (added by the service issue)."""
