"""`curate report` (html: one page to look at before training) and `curate inspect`."""
