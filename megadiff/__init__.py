"""megadiff: tri-modal masked discrete diffusion on megatron-core."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces its pure-PyTorch fallbacks at import time on every CPU box (no
# Transformer Engine/apex there, by design); those notices are expected, not actionable.
for _msg in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
):
    _warnings.filterwarnings("ignore", message=_msg)
