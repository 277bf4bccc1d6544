"""The ppzoo web service: FastAPI app, model loading, request scheduling with batching, and its page.

    python apps/web/serve.py -c serve.yaml        (or `make serve` for the tiny demo models)
"""
