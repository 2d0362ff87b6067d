"""Gradient-weighted relevancy of image pixels for a generated token: the public name of
``minicpmv_attn.maps.relevancy``, which owns it (see its docstring for the method, cost and
memory). It lives in the ``maps`` room so that the demo's pointing game can use it without
importing ``analysis``."""
from ..maps.relevancy import (  # noqa: F401  (re-exported; _grad_attention for the tests)
    RESAMPLER_MODES, RelevancyInputs, RelevancyResult, _grad_attention, relevancy_inputs, relevancy_maps,
    token_relevancy, tokens_relevancy,
)

__all__ = ["RelevancyInputs", "RelevancyResult", "relevancy_inputs", "token_relevancy", "tokens_relevancy",
           "relevancy_maps"]
