"""Serving: an HTTP API with live temptation (``app``), the operator's policy floor (``floor``), the model adapter
(``engine``), the request queue (``worker``) and the web playground (``static/``). See docs/serving.md.

Import the submodules directly (``from pretag.serve.app import create_app``): they pull in FastAPI and torch.
"""
