"""Attention kernels for Wan's DiT blocks: the fp8 quantization recipe, one module per kernel route, and the
diffusers processor that installs a route in every block's self-attention."""
