"""Prefect flows composing the tasks. Importing `tasks` first sets the project's store locations."""

import tasks  # noqa: F401
