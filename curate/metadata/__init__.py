"""Metadata: sources (live site, dumps, HakuBooru), the local store and sync, the query
spec, selection of posts by rules, artist ranking, and fetch (query -> manifest)."""
