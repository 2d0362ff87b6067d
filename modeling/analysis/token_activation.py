"""Token Activation Map (Li et al., ICCV 2025): the public name of
``minicpmv_attn.maps.token_activation``, which owns it (see its docstring for the method and the
choices marked "(ours)"). It lives in the ``maps`` room so that the demo's pointing game can use it
without importing ``analysis``."""
from ..maps.token_activation import (  # noqa: F401  (re-exported)
    TAM_KIND, TokenActivation, estimated_causal_map, final_hidden_states, place_activation, rank_gaussian_filter,
    token_activation, token_activation_map, token_activation_maps,
)
from ..maps.token_activation import __all__  # noqa: F401
