"""`curate review`: a person's triage of the dataset (decisions store, local web app).

`decisions` has no web imports: every stage reads it. `server` (Starlette) is only
imported by the `review` command.
"""
