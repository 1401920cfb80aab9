"""`curate review`: the local web app where a person triages the dataset.

The decisions it writes are read by every stage through curate.common.decisions,
which has no web imports; `server` (Starlette) is only imported by the `review` command.
"""
