"""Images: download of a manifest's files from the site or from archives (tars), into
the content-addressed image store."""
