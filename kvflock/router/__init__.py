"""The request router: one per InferenceService, the OpenAI API in front of its workers.

It sends each request to the replica most likely to hold the prompt's prefix in its KV cache,
bounded by load; falls back to the least-loaded replica; keeps prompt-length pools apart;
retries elsewhere before the first byte; and sheds load when every replica is full.
`app.create_app` builds the FastAPI app; `policy` holds the decisions, free of I/O.
"""
