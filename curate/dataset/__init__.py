"""Dataset stages, each `manifest in -> manifest out`: ingest, dedupe (with its Hamming
index and keeper order), borders and crop, tag (and the tagger models), caption, export."""
