"""megadiff: tri-modal masked discrete diffusion on megatron-core."""

__version__ = "0.1.0"
