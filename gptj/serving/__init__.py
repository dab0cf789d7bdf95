"""An OpenAI-compatible HTTP server over the RequestEngine (FastAPI + uvicorn).

    engine_loop.py  the one thread that steps the engine; tensor-parallel followers
    app.py          the FastAPI app: error handlers and the route groups below
    state.py        what the routes share (the engine loop, tokenizer, adapters) and the API key check
    completions.py  /v1/completions, /v1/chat/completions
    responses.py    engine events -> choices, one JSON body or server-sent events
    models.py       /v1/models
    scoring.py      echoed prompt logprobs, /tokenize, /detokenize, /tokenizer_info, /v1/entailment
    health.py       /health, /metrics
    schemas.py      request bodies and their checks
    text.py         incremental detokenization with stop strings, the chat template
    metrics.py      Prometheus metrics
    errors.py       errors in the OpenAI shape
    server.py       loading the model and running uvicorn (used by run_server.py)
"""
