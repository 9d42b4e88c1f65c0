"""pytest fixtures over aioserver.testing (registered through the pytest11 entry point)."""
