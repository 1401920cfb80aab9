"""The offline demo: a generated corpus (synthetic), a Danbooru look-alike on 127.0.0.1
(devserver) and the driver the Makefile's `demo` target runs (run)."""
