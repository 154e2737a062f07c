"""``llmopt serve``: an OpenAI-compatible HTTP server for any artifact, on one machine or as Ray Serve replicas.

    protocol.py   the request bodies (pydantic, unknown fields refused) and the response shapes
    engine.py     the request queue and the pinned-batch engine (requests grouped up to the batch size)
    continuous.py openvino-genai's continuous-batching pipeline for (dynamic-shape) OpenVINO artifacts
    app.py        the FastAPI application: routes, streaming, errors, health, metrics
    server.py     uvicorn on one machine; ray_app.py the same application as Ray Serve replicas
    load.py       the load bench: concurrent clients against a running server

FastAPI, uvicorn and Ray are imported only here, only when serving.
"""
