"""Moved: the CDS Hooks service is :mod:`fhirplug.serve` (Starlette + uvicorn, the ``[serve]`` extra).

This module keeps the framework-free parts importable under their old names: :class:`CdsService` (a plugin's
discovery entry, prefetch templates and request checks) and :func:`serve_cards` (the cards of one run). The
standard-library ``make_server``/``serve_in_thread`` are gone: they answered anyone (no authentication, CORS
``*``, any Content-Type). Use ``fhirplug serve`` or :func:`fhirplug.serve.create_app` with
:func:`fhirplug.serve.run_in_thread`.
"""

from __future__ import annotations

from fhirplug.serve._cards import CdsService, serve_cards

__all__ = ["CdsService", "serve_cards"]
