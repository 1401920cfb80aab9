"""The lower floor every stage shares: decoding under the guard (decode), normalized
copies (normalize), caption rules, buckets, the train config, reg balance, the review
decisions every stage obeys, thumbnails and the CDN address. Imports only the root
helpers (errors, manifest, schema, pool, engine, http) and itself."""
