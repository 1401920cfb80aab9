"""The Danbooru look-alike the live source's tests use. It lives in the package now
(curate/demo/devserver.py) because the offline demo serves its corpus with it too."""

from curate.demo.devserver import FAULTS, LEVELS, DanbooruServer, Post  # noqa: F401
